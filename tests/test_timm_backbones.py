"""timm backbones (``timm:NAME``): stage maps of CNNs, Swin and a plain ViT (ViTDet's simple
feature pyramid) at the shapes timm's feature_info declares, gradients into the backbone, the
decision only through the masked map, sparse eval equal to the dense path, torch.compile, state
dicts of timm and torchvision classifiers, the features_only fallback (NHWC permuted), timm
missing, pretrained weights offline, and `aim train` / `aim eval` end to end.

Models are timm's own architectures, shrunk through timm.create_model's arguments (one block
per stage, narrow), random weights, 64x64 inputs (32x32 for `aim train`'s tiny dataset)."""
import json
import os
import sys

import pytest
import timm
import torch
import torchvision

import aim
from aim.nn.backbones import build_backbone, load_backbone_weights
from aim.app.cli import main
from aim.nn.timm_backbones import SimpleFeaturePyramid
from tiny_runs import TINY, read_log

SWIN = "timm:swin_tiny_patch4_window7_224"
VIT = "timm:vit_tiny_patch16_224"
# timm.create_model arguments that shrink each architecture (the CNNs are small already).
TINY_KWARGS = {
    "timm:resnet18": {},
    "timm:convnext_atto": {},
    SWIN: {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
    VIT: {"embed_dim": 32, "depth": 3, "num_heads": 2},
}
SIZE = 64


def tiny_aim(name, depth=2, **aim_kwargs):
    backbone = build_backbone(name, stages_used=depth, image_size=SIZE, **TINY_KWARGS[name])
    return aim.AIM(backbone, num_classes=3, depth=depth, out_channels=16, mask_hidden_channels=8, **aim_kwargs)


@pytest.mark.parametrize("name", list(TINY_KWARGS))
def test_stage_maps_masks_and_gradients(name):
    """Stage maps NCHW at feature_info's channels and strides (Swin's NHWC blocks included),
    masks at the shapes of the stages the pathway reads, a gradient for every backbone weight."""
    model = tiny_aim(name, depth=2).train()
    backbone = model.backbone
    images = torch.randn(2, 3, SIZE, SIZE)
    stages = backbone(images)
    assert [tuple(t.shape) for t in stages.values()] == [(2, c, SIZE // s, SIZE // s)
                                                         for c, s in zip(backbone.stage_channels, backbone.stage_strides)]
    if name == VIT:  # the pyramid builds the two levels AIM[2] reads: strides 16 and 32
        assert list(stages) == ["2", "3"] and backbone.stage_strides == [16, 32] and backbone.stage_channels == [32, 32]
    else:  # timm's declared stages, the stride-2 stem of its ResNet left out
        info = timm.create_model(name.removeprefix("timm:"), img_size=SIZE, **TINY_KWARGS[name]) if name == SWIN else \
            timm.create_model(name.removeprefix("timm:"))
        declared = [(i["num_chs"], i["reduction"]) for i in info.feature_info if i["reduction"] >= 4]
        assert list(zip(backbone.stage_channels, backbone.stage_strides)) == declared and list(stages) == ["0", "1", "2", "3"]
    output = model(images)
    assert {k: tuple(m.shape) for k, m in output.masks.items()} == {k: (2, 1, *stages[k].shape[2:]) for k in list(stages)[-2:]}
    (output.logits.sum() + sum(lg.sum() for lg in output.stage_logits.values())).backward()
    # None: not reached. (Zeros are expected: timm's ResNets start their residual branches at zero.)
    assert not [n for n, p in backbone.named_parameters() if p.grad is None]
    assert next(backbone.parameters()).grad.abs().sum() > 0  # the stem's


@pytest.mark.parametrize("name", list(TINY_KWARGS))
def test_sparse_eval_gives_the_dense_logits(name):
    model = tiny_aim(name).eval()
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        sparse = model(images)
        model.topdown.sparse_eval = False
        dense = model(images)
    assert {k: torch.equal(m, dense.masks[k]) for k, m in sparse.masks.items()} == {k: True for k in dense.masks}
    torch.testing.assert_close(sparse.logits, dense.logits, rtol=1e-5, atol=1e-6)


def test_vit_decision_goes_through_the_masked_map_only():
    """No mask position on: every image gets the classifier's bias, whatever the class token."""
    model = tiny_aim(VIT, initial_mask_logit=-1e4, mask_budget="loss").eval()  # the loss budget lets every mask be empty
    with torch.no_grad():
        logits = model(torch.randn(4, 3, SIZE, SIZE)).logits
    torch.testing.assert_close(logits, model.classifier.bias.expand(4, -1))


def test_vit_pyramid_levels_and_chosen_blocks():
    backbone = build_backbone(VIT, image_size=SIZE, pyramid_blocks=[0, 1, 2, -1], **TINY_KWARGS[VIT])
    assert backbone.stage_strides == [4, 8, 16, 32] and backbone.stage_channels == [8, 16, 32, 32]
    assert backbone.take == [0, 1, 2] and backbone.level_inputs == [0, 1, 2, 2]
    shapes = [tuple(t.shape) for t in backbone(torch.randn(1, 3, SIZE, SIZE)).values()]
    assert shapes == [(1, 8, 16, 16), (1, 16, 8, 8), (1, 32, 4, 4), (1, 32, 2, 2)]
    with torch.no_grad():  # each level from its own block: block 0 alone feeds the finest level
        block0 = backbone.model.forward_intermediates(torch.ones(1, 3, SIZE, SIZE), indices=[0], intermediates_only=True)[0]
        torch.testing.assert_close(backbone(torch.ones(1, 3, SIZE, SIZE))["0"], backbone.pyramid.levels["0"](block0))
    assert list(SimpleFeaturePyramid(64, levels=1).levels) == ["3"] and not list(SimpleFeaturePyramid(64, levels=1).parameters())
    with pytest.raises(ValueError, match="pyramid_blocks must be 4 indices among the model's 3 blocks"):
        build_backbone(VIT, image_size=SIZE, pyramid_blocks=[0, 1, 5, 2], **TINY_KWARGS[VIT])
    with pytest.raises(ValueError, match="pyramid_levels must be an int in 1..4"):
        SimpleFeaturePyramid(64, levels=0)
    with pytest.raises(ValueError, match="depth must be an int in 1..4"):
        aim.AIM(build_backbone(VIT, image_size=SIZE, **TINY_KWARGS[VIT]), num_classes=2, depth=5)


def test_compile_whole_model_train_and_eval_without_graph_breaks():
    """torch.compile (aot_eager: dynamo and AOTAutograd, no code generation) of AIM on Swin and
    ViT, fullgraph, training step and eval, against eager."""
    for name in (SWIN, VIT):
        torch.manual_seed(0)
        model = tiny_aim(name)
        images = torch.randn(2, 3, SIZE, SIZE)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        model.eval()
        torch.testing.assert_close(compiled(images).logits, model(images).logits, rtol=1e-4, atol=1e-5)
        model.train()
        torch.manual_seed(1)
        compiled(images).logits.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same Gumbel noise
        model(images).logits.sum().backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.slow
def test_compile_inductor_vit():
    """The default backend: inductor's C++ code (54 s on this 2-core machine with a cold compile cache,
    8 s once inductor's on-disk cache holds it)."""
    model = tiny_aim(VIT).eval()
    images = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(torch.compile(model)(images).logits, model(images).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["timm:resnet18", VIT])
def test_timm_classifier_state_dict_loads_and_new_layers_stay(name):
    """Every backbone entry of the classifier's state dict loads (its head and final norm are
    not the backbone's); the pyramid, AIM's own layers like the pathway, keeps its init."""
    kwargs = dict(img_size=SIZE, **TINY_KWARGS[name]) if name == VIT else {}
    classifier = timm.create_model(name.removeprefix("timm:"), num_classes=7, **kwargs)
    backbone = build_backbone(name, image_size=SIZE, **TINY_KWARGS[name])
    pyramid = {k: v.clone() for k, v in backbone.state_dict().items() if k.startswith("pyramid.")}
    load_backbone_weights(backbone, classifier.state_dict(), "classifier.pth")
    loaded = backbone.state_dict()
    placed = {k: v for k, v in classifier.state_dict().items() if k not in backbone.classifier_only_keys}
    assert placed and all(torch.equal(loaded[f"model.{k}"], v) for k, v in placed.items())
    assert set(backbone.classifier_only_keys) >= {"head.weight" if name == VIT else "fc.weight"}
    assert len(loaded) == len(placed) + len(pyramid) and all(torch.equal(loaded[k], v) for k, v in pyramid.items())


def test_baseline_checkpoint_of_a_vit_starts_a_deeper_aim():
    """The baseline's pyramid builds one level (no weights); AIM[3]'s finer level is new."""
    baseline = aim.nn.backbones.BaselineClassifier(build_backbone(VIT, stages_used=1, image_size=SIZE, **TINY_KWARGS[VIT]), 2)
    checkpoint = {"config": {}, "model": baseline.state_dict()}
    backbone = build_backbone(VIT, stages_used=3, image_size=SIZE, **TINY_KWARGS[VIT])
    load_backbone_weights(backbone, checkpoint, "best.pt")
    assert torch.equal(backbone.state_dict()["model.blocks.2.mlp.fc2.weight"], baseline.state_dict()["backbone.model.blocks.2.mlp.fc2.weight"])
    assert backbone.stage_names == ["1", "2", "3"] and any(k.startswith("pyramid.levels.1.") for k in backbone.state_dict())


def test_torchvision_resnet_state_dict_loads_into_timm_resnet():
    classifier = torchvision.models.resnet18(num_classes=5)
    backbone = build_backbone("timm:resnet18")
    load_backbone_weights(backbone, classifier.state_dict(), "torchvision_resnet18.pth")
    assert torch.equal(backbone.state_dict()["model.layer4.1.conv2.weight"], classifier.state_dict()["layer4.1.conv2.weight"])


def test_state_dicts_that_do_not_fit_name_their_keys():
    backbone = build_backbone("timm:convnext_atto")
    state = timm.create_model("convnext_atto").state_dict()
    with pytest.raises(ValueError, match=r"1 missing \(e.g. \['model.stages.3.blocks.1.gamma'\]\), 1 unexpected "
                                         r"\(e.g. \['stages.3.blocks.1.scale'\]\)"):
        load_backbone_weights(backbone, {**{k: v for k, v in state.items() if k != "stages.3.blocks.1.gamma"},
                                         "stages.3.blocks.1.scale": state["stages.3.blocks.1.gamma"]}, "renamed.pth")
    with pytest.raises(ValueError, match="none of its .* entries names a parameter"):
        load_backbone_weights(backbone, torchvision.models.resnet18().state_dict(), "resnet18.pth")
    with pytest.raises(ValueError, match="does not fit the backbone: size mismatch"):
        load_backbone_weights(backbone, timm.create_model("convnext_femto").state_dict(), "femto.pth")


def test_features_only_fallback_permutes_nhwc_and_loads_renamed_keys(monkeypatch):
    """A model without forward_intermediates goes through timm's features_only wrapper: MambaOut's
    NHWC stage maps reach the pathway as NCHW; its classifier's state dict loads, though the
    wrapper renames "stages.0" to "stages_0"."""
    from timm.models.mambaout import MambaOut

    kwargs = {"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)}
    classifier = timm.create_model("mambaout_femto", **kwargs)
    monkeypatch.delattr(MambaOut, "forward_intermediates")
    backbone = build_backbone("timm:mambaout_femto", **kwargs)
    assert backbone.features_only and backbone.outputs_nhwc
    load_backbone_weights(backbone, classifier.state_dict(), "mambaout.pth")
    assert backbone.model_key_of["stages.0.blocks.0.norm.weight"] == "model.stages_0.blocks.0.norm.weight"
    model = aim.AIM(backbone, num_classes=2, out_channels=8, mask_hidden_channels=8)
    output = model(torch.randn(1, 3, SIZE, SIZE))
    assert backbone.stage_channels == [8, 16, 24, 32]
    assert {k: tuple(m.shape) for k, m in output.masks.items()} == {"2": (1, 1, 4, 4), "3": (1, 1, 2, 2)}
    with torch.no_grad():  # the features themselves: the classifier's NHWC stage output, permuted
        classifier.eval(), backbone.eval()
        expected = classifier.stages[:4](classifier.stem(torch.ones(1, 3, SIZE, SIZE))).permute(0, 3, 1, 2)
        torch.testing.assert_close(backbone(torch.ones(1, 3, SIZE, SIZE))["3"], expected)


def test_without_timm_a_timm_name_says_what_to_install(monkeypatch, waterbirds, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ValueError, match=r"need timm, an optional dependency: pip install \.\[timm\]"):
        aim.AIM("timm:resnet18", num_classes=2)
    args = ["train", "--data", str(waterbirds), "--out", str(tmp_path / "run"), *TINY]
    args[args.index("small_convnet")] = "timm:resnet18"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install .[timm]" in err and not (tmp_path / "run").exists()


def test_bad_names_and_arguments_are_one_line_errors(waterbirds, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"timm has no model .resnet1800. \(similar: "):
        build_backbone("timm:resnet1800")
    with pytest.raises(ValueError, match="model arguments apply to timm:NAME backbones only"):
        build_backbone("resnet18", depth=2)
    with pytest.raises(ValueError, match="weights for timm:resnet18 must be None or 'DEFAULT'"):
        aim.AIM("timm:resnet18", num_classes=2, weights="IMAGENET1K_V1")
    base = ["train", "--data", str(waterbirds), "--out", str(tmp_path / "run"), *TINY]
    for changes, message in [({"small_convnet": "timm:vit_tiny_patch16_224"}, "--timm-kwargs {\"not_an_argument\": 1}: "),
                             ({}, "--timm-kwargs must be a JSON object and the backbone timm:NAME")]:
        args = [changes.get(a, a) for a in base] + ["--timm-kwargs", '{"not_an_argument": 1}']
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_pretrained_offline_is_one_line_naming_the_alternative(monkeypatch, waterbirds, tmp_path, capsys):
    """timm's own hub code runs; only the download itself fails, as it does without network."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot find "
                                      "the requested files in the local cache.")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", offline)
    with pytest.raises(OSError, match="locate the file on the Hub"):
        aim.AIM("timm:resnet18", num_classes=2, weights="DEFAULT")
    args = ["train", "--data", str(waterbirds), "--out", str(tmp_path / "run"), "--weights", "DEFAULT", *TINY]
    args[args.index("small_convnet")] = "timm:resnet18"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not download timm's pretrained timm:resnet18 weights" in err
    assert "timm.create_model('resnet18', pretrained=True).state_dict()" in err and "--weights PATH" in err


@pytest.mark.parametrize("name", [SWIN, VIT])
def test_train_one_epoch_then_eval(name, waterbirds, tmp_path, capsys):
    """`aim train` end to end on the tiny generated WaterBirds (32x32: the ViT and Swin are built
    for it), then `aim eval` of its checkpoint with GradCAM on the coarsest stage map."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(waterbirds), "--out", str(run), "--epochs", "1", *TINY,
                 "--backbone", name, "--timm-kwargs", json.dumps(TINY_KWARGS[name])]) == 0
    row = read_log(run)[0]
    assert set(row["mask_active_fraction"]) == {"2", "3"} and 0 <= row["val"]["accuracy"] <= 1
    config = json.loads((run / "config.json").read_text())
    assert config["backbone"] == name and config["timm_kwargs"] == json.loads(json.dumps(TINY_KWARGS[name]))
    metrics = tmp_path / "metrics.json"
    assert main(["eval", str(run / "best.pt"), "--data", str(waterbirds), "--workers", "0", "--batch-size", "8",
                 "--segmentations", str(waterbirds / "segmentations"), "--json", str(metrics)]) == 0
    result = json.loads(metrics.read_text())
    assert 0 <= result["accuracy"] <= 1 and "gradcam" in json.dumps(result)


def test_profile_accepts_timm_names(capsys):
    assert main(["profile", "--backbone", VIT, "--image-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert f"AIM[2] on {VIT} at 64x64" in printed and "added" in printed


def test_bench_passes_backbones_to_the_backbones_benchmark_only(tmp_path, capsys):
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    for name in ("backbones", "other"):  # each writes the arguments it was given
        (folder / f"bench_{name}.py").write_text(
            "import json, os, sys\n"
            "os.makedirs(os.path.join(os.path.dirname(__file__), 'results'), exist_ok=True)\n"
            f"json.dump({{'argv': sys.argv[1:]}}, open(os.path.join(os.path.dirname(__file__), 'results', '{name}.json'), 'w'))\n")
    out = tmp_path / "out"
    assert main(["bench", "--benchmarks", str(folder), "--out", str(out), "--backbones", VIT, "resnet18"]) == 0
    assert json.loads((out / "backbones.json").read_text())["argv"] == ["--backbones", VIT, "resnet18"]
    assert json.loads((out / "other.json").read_text())["argv"] == []
    assert main(["bench", "--benchmarks", str(folder), "--out", str(tmp_path / "only"), "--only", "other"]) == 0
    assert [p.name for p in (tmp_path / "only").iterdir() if p.suffix == ".json" and p.name != "runs.json"] == ["other.json"]
    assert main(["bench", "--benchmarks", str(folder), "--out", str(out), "--only", "nothing"]) == 2
    assert "--only nothing: no such benchmark" in capsys.readouterr().err


def test_the_study_pretrains_a_timm_backbone_under_its_own_cache_key(tmp_path):
    """benchmarks/study_spurious.py --set backbone=timm:... pretrains that backbone, not SmallConvNet."""
    from aim.app import study

    settings = study.PretrainSettings(image_size=SIZE, train_size=16, val_size=8, epochs=1, batch_size=8,
                                      backbone=VIT, timm_kwargs=TINY_KWARGS[VIT])
    path, trained, _ = study.pretrained_backbone(settings, log=lambda *a: None, cache=str(tmp_path))
    assert trained and os.path.basename(path).startswith("timm_vit_tiny_patch16_224_")
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["config"]["backbone"] == VIT and checkpoint["config"]["timm_kwargs"] == TINY_KWARGS[VIT]
    assert study.pretrained_backbone(settings, log=lambda *a: None, cache=str(tmp_path))[:2] == (path, False)  # cached
