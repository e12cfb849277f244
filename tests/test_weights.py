"""Backbone weights: torchvision state dicts load into aim.AIM's backbone with strict=True
(the backbone keeps torchvision's parameter names), `aim train` checkpoints of either model
kind load into the other, and a file that fits nothing, or DEFAULT weights offline, stop
`aim train` at once with one line."""
import re
import urllib.error

import pytest
import torch
import torchvision

import aim
from aim.nn.backbones import build_backbone, load_backbone_weights
from aim.app.cli import main
from tiny_runs import TINY, read_log


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny"])
def test_torchvision_state_dict_loads_strictly_into_aim(name):
    classifier = torchvision.models.get_model(name, weights=None, num_classes=7)
    model = aim.AIM(build_backbone(name), num_classes=2, out_channels=16, mask_hidden_channels=8)
    load_backbone_weights(model.backbone, classifier.state_dict(), "classifier")
    loaded = model.backbone.state_dict()
    for key, value in classifier.state_dict().items():
        if not key.startswith(("fc.", "classifier.")):
            assert torch.equal(loaded[key], value), key  # the same names, every entry loaded
    assert len(loaded) == len([k for k in classifier.state_dict() if not k.startswith(("fc.", "classifier."))])


def test_weights_that_fit_nothing_or_partly_are_errors():
    backbone = build_backbone("resnet18")
    convnext = torchvision.models.get_model("convnext_tiny", weights=None).state_dict()
    with pytest.raises(ValueError, match="none of its .* entries names a parameter"):
        load_backbone_weights(backbone, convnext, "convnext.pth")
    partial = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("layer4")}
    with pytest.raises(ValueError, match=r"missing \(e.g. \['layer4"):
        load_backbone_weights(backbone, partial, "partial.pth")
    wrong_shape = torchvision.models.resnet34().state_dict()
    with pytest.raises(ValueError, match="does not fit"):
        load_backbone_weights(backbone, wrong_shape, "resnet34.pth")


def test_pretrain_baseline_then_finetune_aim_from_its_checkpoint(waterbirds, tmp_path, capsys):
    """Two commands: the baseline's backbone starts AIM; the reverse direction loads too."""
    pretrained = tmp_path / "pretrain"
    assert main(["train", "--data", str(waterbirds), "--out", str(pretrained), "--model", "baseline", "--epochs", "1", *TINY]) == 0
    finetuned = tmp_path / "finetune"
    assert main(["train", "--data", str(waterbirds), "--out", str(finetuned), "--weights", str(pretrained / "last.pt"),
                 "--epochs", "1", "--lr", "0", *TINY]) == 0
    source = torch.load(pretrained / "last.pt", weights_only=True)["model"]
    result = torch.load(finetuned / "last.pt", weights_only=True)["model"]
    weights = [k for k in source if k.startswith("backbone.") and k.endswith("weight")]
    assert weights and all(torch.equal(source[k], result[k]) for k in weights)  # lr 0: the loaded weights, unchanged
    assert read_log(finetuned)[0]["val"]["accuracy"] >= 0
    back = tmp_path / "back"
    assert main(["train", "--data", str(waterbirds), "--out", str(back), "--model", "baseline",
                 "--weights", str(finetuned / "best.pt"), "--epochs", "1", *TINY]) == 0


@pytest.mark.parametrize("layers", ["all", "lateral"])
def test_pathway_weights_start_aims_pathway_from_another_runs_and_its_classifiers_new(waterbirds, tmp_path, capsys, layers):
    """--weights and --pathway-weights from one AIM run: the whole network but the classifiers
    (and with --pathway-layers lateral, but the mask estimators)."""
    source_run, run = tmp_path / "source", tmp_path / "run"
    assert main(["train", "--data", str(waterbirds), "--out", str(source_run), "--epochs", "1", *TINY]) == 0
    best = source_run / "best.pt"
    assert main(["train", "--data", str(waterbirds), "--out", str(run), "--weights", str(best), "--pathway-weights", str(best),
                 "--pathway-layers", layers, "--epochs", "1", "--lr", "0", "--seed", "1", *TINY]) == 0
    source = torch.load(best, weights_only=True)["model"]
    result = torch.load(run / "last.pt", weights_only=True)["model"]
    lateral = [k for k in source if k.startswith("topdown.lateral.")]
    estimators = [k for k in source if k.startswith("topdown.mask_estimators.") and k.endswith("weight")]
    assert lateral and estimators
    assert all(torch.equal(source[k], result[k]) for k in lateral)  # lr 0: as loaded
    assert all(torch.equal(source[k], result[k]) for k in estimators) == (layers == "all")  # else another seed's init
    assert not torch.equal(source["classifier.weight"], result["classifier.weight"])


@pytest.mark.parametrize("source_flags, message", [
    (["--model", "baseline"], "holds no top-down pathway"),
    (["--depth", "1"], r"does not fit this run's .*: [1-9]\d* missing"),
    (["--mask-channels", "4"], "of another shape"),
])
def test_pathway_weights_that_do_not_fit_stop_train_at_once(waterbirds, tmp_path, capsys, source_flags, message):
    source_run, run = tmp_path / "source", tmp_path / "run"
    assert main(["train", "--data", str(waterbirds), "--out", str(source_run), "--epochs", "1", *TINY, *source_flags]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(waterbirds), "--out", str(run), "--pathway-weights", str(source_run / "best.pt"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--pathway-weights {source_run / 'best.pt'}:" in err and not run.exists()
    assert re.search(message, err), err


def test_pathway_weights_need_an_aim_model(waterbirds, tmp_path, capsys):
    assert main(["train", "--data", str(waterbirds), "--out", str(tmp_path / "run"), "--model", "baseline",
                 "--pathway-weights", str(tmp_path / "any.pt"), *TINY]) == 2
    assert "--pathway-weights applies to --model aim only" in capsys.readouterr().err


def test_weights_file_that_does_not_fit_stops_train_at_once(waterbirds, tmp_path, capsys):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    run = tmp_path / "run"
    assert main(["train", "--data", str(waterbirds), "--out", str(run), "--weights", str(path), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--weights {path}: none of its" in err and not run.exists()


def test_default_weights_offline_name_the_alternative(waterbirds, tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    run = tmp_path / "run"
    args = ["train", "--data", str(waterbirds), "--out", str(run), "--weights", "DEFAULT", *TINY]
    args[args.index("small_convnet")] = "resnet18"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not download torchvision's pretrained resnet18" in err
    assert "--weights PATH" in err and "--weights none" in err and not run.exists()
