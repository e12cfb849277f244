"""The embedded spurious-correlation benchmark (aim.data.embedded), the protocol (aim.app.study) and
``aim demo`` on tiny sizes."""
import json
import math

import pytest
import torch
import torchvision

from aim.app import study
from aim.app.cli import main
from aim.data.embedded import (AREA_RANGE, FINETUNE_CLASSES, HARDER_CLASSES, PRETRAIN_SHAPES, SCENES, SMALL_AREA_RANGE,
                               TEXTURES, UNSEEN_SCENES, colour_histograms, linear_probe_accuracy, make_pretraining_split,
                               make_spurious_split, make_unseen_scene_split)


def binomial_margin(p, n, sigmas=4.0):
    """Half-width of a sigmas-wide interval of a fraction of n Bernoulli(p) draws."""
    return sigmas * math.sqrt(p * (1 - p) / n)


def test_object_area_is_drawn_independently_of_the_class():
    split = make_pretraining_split(2000, 64, seed=3)
    area = split.foregrounds.flatten(1).float().mean(1)
    # Rasterization at 64 px keeps every area within a few pixels of the drawn one.
    assert area.min() >= AREA_RANGE[0] - 0.02 and area.max() <= AREA_RANGE[1] + 0.02
    expected = sum(AREA_RANGE) / 2
    spread = (AREA_RANGE[1] - AREA_RANGE[0]) / math.sqrt(12)  # std of the uniform draw
    for k, name in enumerate(PRETRAIN_SHAPES):
        members = area[split.labels == k]
        assert abs(members.mean().item() - expected) < 4 * spread / math.sqrt(len(members)) + 0.003, name


def test_splits_have_the_requested_correlation_and_balance():
    n = 2000
    for correlation in (0.95, 1.0, 0.0):
        split = make_spurious_split(n, 32, correlation, seed=1)
        agree = (split.labels == split.backgrounds).float().mean().item()
        assert abs(agree - correlation) <= binomial_margin(correlation, n) + 1e-9
        assert split.labels.sum().item() == n // 2  # classes balanced exactly
    balanced = make_spurious_split(400, 32, seed=2, balanced=True)
    assert torch.bincount(balanced.groups, minlength=4).tolist() == [100] * 4
    pretrain = make_pretraining_split(500, 32, seed=0)
    assert torch.bincount(pretrain.labels).tolist() == [50] * len(PRETRAIN_SHAPES)
    assert set(pretrain.backgrounds.tolist()) == set(range(len(TEXTURES)))


def test_generation_is_deterministic_and_foregrounds_match_the_pasted_colour():
    a, b = make_spurious_split(64, 48, 0.95, seed=5), make_spurious_split(64, 48, 0.95, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.foregrounds, b.foregrounds)
    assert not torch.equal(a.images, make_spurious_split(64, 48, 0.95, seed=6).images)
    assert a.class_names == tuple(FINETUNE_CLASSES) and a.background_names == tuple(SCENES)
    assert a.images.min() >= 0 and a.images.max() <= 1
    # 8-bit levels, as the file pipeline converts them: a PNG of the image reads back equal.
    levels = (a.images * 255).round().to(torch.uint8)
    assert torch.equal(torchvision.transforms.v2.functional.to_dtype(levels, torch.float32, scale=True), a.images)
    # Inside the foreground every pixel is the object's colour (plus the small pixel noise).
    fg = a.foregrounds[:, 0].bool()
    for i in range(8):
        pixels = a.images[i][:, fg[i]]
        assert pixels.std(1).max() < 0.05


def test_classes_are_unseen_sub_shapes_and_scenes_are_families():
    """Each fine-tuning class is a superclass of sub-shapes absent from pretraining, each drawn;
    each background a superclass of texture families; the unseen-scene split uses others."""
    members = [shape for shapes in FINETUNE_CLASSES.values() for shape in shapes]
    assert not set(members) & set(PRETRAIN_SHAPES) and len(set(members)) == len(members)
    assert not set(UNSEEN_SCENES) & {family for scene in SCENES.values() for family in scene}
    n = 1200
    split = make_spurious_split(n, 48, 0.95, seed=3)
    for k, (name, shapes) in enumerate(FINETUNE_CLASSES.items()):
        drawn = [split.shapes[i] for i in range(n) if split.labels[i] == k]
        for shape in shapes:  # sub-shapes uniform within their class
            assert abs(drawn.count(shape) / len(drawn) - 1 / 3) <= binomial_margin(1 / 3, len(drawn)), (name, shape)
    for b, (name, families) in enumerate(SCENES.items()):
        drawn = [split.scenes[i] for i in range(n) if split.backgrounds[i] == b]
        assert set(drawn) == set(families), name
        for family in families:
            assert abs(drawn.count(family) / len(drawn) - 1 / 3) <= binomial_margin(1 / 3, len(drawn)), (name, family)
    unseen = make_unseen_scene_split(400, 32, seed=4)
    assert unseen.background_names == UNSEEN_SCENES and torch.bincount(unseen.groups).tolist() == [100] * 4
    assert [unseen.scenes[i] for i in range(4)] == [UNSEEN_SCENES[b] for b in unseen.backgrounds[:4].tolist()]


@pytest.mark.parametrize("classes, area_range", [(FINETUNE_CLASSES, AREA_RANGE), (HARDER_CLASSES, AREA_RANGE),
                                                (FINETUNE_CLASSES, SMALL_AREA_RANGE)])
def test_no_class_leaks_through_colour_histograms(classes, area_range):
    """A linear probe on colour histograms finds the background (the probe works) but not the class."""
    train = make_spurious_split(800, 32, seed=10, balanced=True, classes=classes, area_range=area_range)
    test = make_spurious_split(800, 32, seed=11, balanced=True, classes=classes, area_range=area_range)
    # The objects follow area_range (single images deviate by pixel rounding of the outline; the mean does not).
    assert area_range[0] < float(train.foregrounds.float().mean()) < area_range[1]
    h_train, h_test = colour_histograms(train.images), colour_histograms(test.images)
    assert torch.allclose(h_train.sum(1), torch.ones(800))
    class_accuracy = linear_probe_accuracy(h_train, train.labels, h_test, test.labels)
    assert abs(class_accuracy - 0.5) <= binomial_margin(0.5, 800)
    assert linear_probe_accuracy(h_train, train.backgrounds, h_test, test.backgrounds) > 0.95


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="image_size"):
        make_spurious_split(10, 16)
    with pytest.raises(ValueError, match="spurious_correlation"):
        make_spurious_split(10, 32, 1.5)
    with pytest.raises(ValueError, match="multiple of the 4 groups"):
        make_spurious_split(10, 32, balanced=True)
    with pytest.raises(ValueError, match="classes"):
        make_spurious_split(8, 32, classes={"a": ("disk",), "b": ("disk",)})
    with pytest.raises(ValueError, match="classes"):
        make_spurious_split(8, 32, classes={"a": ("disk",), "b": ("no_such_shape",)})
    with pytest.raises(ValueError, match="area_range"):
        make_spurious_split(8, 32, area_range=(0.1, 0.05))
    with pytest.raises(ValueError, match="num_images"):
        make_pretraining_split(0, 32)


def test_demo_runs_the_protocol_and_caches_the_pretrained_backbone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    task = ["--train-size", "128", "--val-size", "64", "--test-size", "64", "--unseen-size", "32", "--image-size", "32"]
    args = ["demo", "--out", str(tmp_path / "out"), "--epochs", "2", "--anneal-epochs", "1", *task,
            "--pretrain-size", "100", "--pretrain-epochs", "1", "--pathway-epochs", "1", "--batch-size", "32"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "pretrained backbone (trained now)" in printed and "pretrained AIM pathway (trained now)" in printed
    assert "worst-group accuracy" in printed and "EPG of mask, stage 2" in printed and "EPG of GradCAM" in printed
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for kind in ("baseline", "aim"):
        record = summary["records"][kind]
        assert record["test"]["num_samples"] == 64
        assert (tmp_path / "out" / kind / "best.pt").exists()  # a run folder `aim eval` reads
    # AIM's pathway starts from the one pretrained on the unbiased images; the baseline has none.
    assert summary["records"]["aim"]["settings"]["pathway_weights"] == summary["pretrained_pathway"]
    assert summary["records"]["baseline"]["settings"]["pathway_weights"] == "none"
    assert study.pretrained_pathway(study.PretrainSettings(), summary["pretrained_backbone"],
                                    study.PathwaySettings(epochs=0)) == (None, False, None)  # --pathway-epochs 0: none
    # AIM is selected only among epochs at the target tau (select_annealed): here the last one.
    assert summary["records"]["aim"]["best_epoch"] == 2
    assert set(summary["table"]["aim"]["epg_masks"]) == {"2", "3"}
    assert summary["table"]["baseline"]["epg_masks"] == {}
    assert [row["tau"] for row in summary["records"]["aim"]["val_curve"]] == [1.0, 0.1]  # the demo's --target
    assert (tmp_path / "out" / "test_images.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {tmp_path / 'out' / 'report.html'}" in printed
    assert "<table id=\"accuracy\">" in (tmp_path / "out" / "report.html").read_text()
    assert main(args) == 0  # the second run finds the backbone in the cache
    printed = capsys.readouterr().out
    assert "pretrained backbone (from the cache)" in printed and "pretrained AIM pathway (from the cache)" in printed
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())

    # The same task from disk: `aim eval` of the demo's checkpoints prints the demo's test numbers.
    data = tmp_path / "data"
    assert main(["data", "embedded", "--out", str(data), *task]) == 0
    for kind in ("baseline", "aim"):
        out = tmp_path / f"{kind}.json"
        assert main(["eval", str(tmp_path / "out" / kind / "best.pt"), "--data", str(data), "--segmentations",
                     str(data / "segmentations"), "--json", str(out), "--workers", "0", "--batch-size", "100"]) == 0
        on_disk, in_memory = json.loads(out.read_text()), summary["records"][kind]["test"]
        for key in ("num_samples", "accuracy", "group_accuracy", "worst_group_accuracy", "weighted_accuracy"):
            assert on_disk[key] == in_memory[key], (kind, key)
        assert on_disk["energy_pointing_game"] == pytest.approx(in_memory["energy_pointing_game"], abs=1e-6)
        assert on_disk["decision_audit"]["object"] == pytest.approx(in_memory["decision_audit"]["object"], abs=1e-6)
        unseen = tmp_path / f"{kind}_unseen.json"
        assert main(["eval", str(tmp_path / "out" / kind / "best.pt"), "--data", str(data / "unseen_scenes"),
                     "--json", str(unseen), "--workers", "0", "--batch-size", "100", "--no-gradcam"]) == 0
        assert json.loads(unseen.read_text())["group_accuracy"] == in_memory["unseen_scenes"]["group_accuracy"]


def test_study_options_of_the_model_loss_and_schedule():
    import aim
    from aim.nn.backbones import SmallConvNet

    torch.manual_seed(0)
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    for logit in (-1.0, 3.0):  # eval-mode masks threshold the initial logit at 0
        # "loss" budget: its eval masks are the logits' own threshold ("eval" would keep the target share)
        model = aim.AIM(SmallConvNet(), num_classes=2, out_channels=8, mask_hidden_channels=8, initial_mask_logit=logit,
                        mask_budget="loss").eval()
        for estimator in model.topdown.mask_estimators:
            torch.nn.init.zeros_(estimator.to_logit.weight)
            torch.nn.init.zeros_(estimator.global_branch.weight)
            torch.nn.init.zeros_(estimator.global_branch.bias)
        with torch.no_grad():
            masks = model(images).masks.values()
        assert all(bool((m == (1.0 if logit > 0 else 0.0)).all()) for m in masks)
    out = model.train()(images)
    weighted = aim.AIMLoss(stage_weight=0.5)(out, labels, 0.5)
    plain = aim.AIMLoss(stage_weight=0.0)(out, labels, 0.5)
    stage_ce = sum(torch.nn.functional.cross_entropy(s, labels) for s in out.stage_logits.values())
    assert torch.allclose(weighted.classification - plain.classification, 0.5 * stage_ce)
    assert torch.allclose(plain.classification, torch.nn.functional.cross_entropy(out.logits, labels))
    # Constant logits 0.5: with Gumbel noise about 38% of the entries drop, without it none.
    for estimator in model.topdown.mask_estimators:
        torch.nn.init.constant_(estimator.to_logit.bias, 0.5)
    model.train()
    with torch.no_grad():
        assert any(bool((m == 0).any()) for m in model(images).masks.values())
        model.topdown.gumbel_noise = False
        assert all(bool((m == 1).all()) for m in model(images).masks.values())
    schedule = aim.MaskAnnealing(0.25, anneal_epochs=3, warmup_epochs=2)
    assert [schedule(e) for e in range(6)] == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="warmup_epochs"):
        aim.MaskAnnealing(0.25, 3, warmup_epochs=-1)
    from aim.config import TrainConfig

    assert TrainConfig().select_annealed  # the default: best.pt is a model at the target tau
    TrainConfig(select_annealed=True, epochs=3, anneal_epochs=3).check()  # never at the target: all epochs count


def test_study_script_on_a_waterbirds_layout_folder(tmp_path):
    """benchmarks/study_spurious.py --data/--segmentations: both models, test EPG of GradCAM and masks."""
    import importlib.util
    import os

    from aim.data.toy import make_toy_split, save_waterbirds_layout

    # Loaded from its path: it is a script of benchmarks/, not a module of a package.
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "study_spurious.py")
    spec = importlib.util.spec_from_file_location("study_spurious", script)
    study_spurious = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study_spurious)

    root = tmp_path / "wb"
    splits = {"train": make_toy_split(64, 32, 0.95, seed=0), "val": make_toy_split(32, 32, 0.5, seed=1),
              "test": make_toy_split(32, 32, 0.5, seed=2)}
    save_waterbirds_layout(str(root), splits)
    study_spurious.main(["--data", str(root), "--segmentations", str(root / "segmentations"), "--backbone", "small_convnet",
                         "--image-size", "32", "--seeds", "0", "--set", "epochs=2", "--set", "anneal_epochs=1",
                         "--set", "batch_size=32", "--out", str(tmp_path / "result")])
    result = json.loads((tmp_path / "result.json").read_text())
    assert [row["model"] for row in result["summary"]] == ["baseline", "aim"]
    aim_record = result["records"][1]
    assert aim_record["test"]["num_samples"] == 32 and set(aim_record["test"]["energy_pointing_game"]) == {"2", "3", "gradcam"}
    assert (tmp_path / "result.csv").exists() and (tmp_path / "result.png").read_bytes()[:4] == b"\x89PNG"
