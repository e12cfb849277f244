"""The embedded spurious-correlation benchmark (aim.data.embedded), the protocol (aim.study) and
``aim demo`` on tiny sizes."""
import json
import math

import pytest
import torch

from aim.cli import main
from aim.data.embedded import (AREA_RANGE, FINETUNE_SHAPES, HARDER_SHAPES, SHAPE_NAMES, SMALL_AREA_RANGE, TEXTURES,
                               colour_histograms, linear_probe_accuracy, make_pretraining_split, make_spurious_split)


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
    for k, name in enumerate(SHAPE_NAMES):
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
    assert torch.bincount(pretrain.labels).tolist() == [50] * len(SHAPE_NAMES)
    assert set(pretrain.backgrounds.tolist()) == set(range(len(TEXTURES)))


def test_generation_is_deterministic_and_foregrounds_match_the_pasted_colour():
    a, b = make_spurious_split(64, 48, 0.95, seed=5), make_spurious_split(64, 48, 0.95, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.foregrounds, b.foregrounds)
    assert not torch.equal(a.images, make_spurious_split(64, 48, 0.95, seed=6).images)
    assert a.class_names == FINETUNE_SHAPES and a.images.min() >= 0 and a.images.max() <= 1
    # Inside the foreground every pixel is the object's colour (plus the small pixel noise).
    fg = a.foregrounds[:, 0].bool()
    for i in range(8):
        pixels = a.images[i][:, fg[i]]
        assert pixels.std(1).max() < 0.05


@pytest.mark.parametrize("shapes, area_range", [(FINETUNE_SHAPES, AREA_RANGE), (HARDER_SHAPES, AREA_RANGE),
                                               (FINETUNE_SHAPES, SMALL_AREA_RANGE)])
def test_no_class_leaks_through_colour_histograms(shapes, area_range):
    """A linear probe on colour histograms finds the background (the probe works) but not the class."""
    train = make_spurious_split(800, 32, seed=10, balanced=True, shapes=shapes, area_range=area_range)
    test = make_spurious_split(800, 32, seed=11, balanced=True, shapes=shapes, area_range=area_range)
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
    with pytest.raises(ValueError, match="shapes"):
        make_spurious_split(8, 32, shapes=("disk", "disk"))
    with pytest.raises(ValueError, match="area_range"):
        make_spurious_split(8, 32, area_range=(0.1, 0.05))
    with pytest.raises(ValueError, match="num_images"):
        make_pretraining_split(0, 32)


def test_demo_runs_the_protocol_and_caches_the_pretrained_backbone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["demo", "--out", str(tmp_path / "out"), "--epochs", "2", "--anneal-epochs", "1", "--train-size", "128",
            "--val-size", "64", "--test-size", "64", "--pretrain-size", "100", "--pretrain-epochs", "1",
            "--image-size", "32", "--batch-size", "32"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "pretrained backbone (trained now)" in printed
    assert "worst-group accuracy" in printed and "EPG of mask, stage 2" in printed and "EPG of GradCAM" in printed
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for kind in ("baseline", "aim"):
        record = summary["records"][kind]
        assert record["test"]["num_samples"] == 64
        assert (tmp_path / "out" / kind / "best.pt").exists()  # a run folder `aim eval` reads
    # AIM is selected only among epochs at the target tau (select_annealed): here the last one.
    assert summary["records"]["aim"]["best_epoch"] == 2
    assert set(summary["table"]["aim"]["epg_masks"]) == {"2", "3"}
    assert summary["table"]["baseline"]["epg_masks"] == {}
    assert [row["tau"] for row in summary["records"]["aim"]["val_curve"]] == [1.0, 0.25]
    assert (tmp_path / "out" / "conflicting_test_images.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(args) == 0  # the second run finds the backbone in the cache
    assert "pretrained backbone (from the cache)" in capsys.readouterr().out


def test_study_options_of_the_model_loss_and_schedule():
    import aim
    from aim.backbones import SmallConvNet

    torch.manual_seed(0)
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    for logit in (-1.0, 3.0):  # eval-mode masks threshold the initial logit at 0
        model = aim.AIM(SmallConvNet(), num_classes=2, out_channels=8, mask_hidden_channels=8, initial_mask_logit=logit).eval()
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
    from aim.train import TrainConfig

    with pytest.raises(ValueError, match="select-annealed"):
        TrainConfig(select_annealed=True, epochs=4, anneal_epochs=3, warmup_epochs=1).check()
    TrainConfig(select_annealed=True, epochs=5, anneal_epochs=3, warmup_epochs=1).check()


def test_study_script_on_a_waterbirds_layout_folder(tmp_path):
    """benchmarks/study_spurious.py --data/--segmentations: both models, test EPG of GradCAM and masks."""
    import importlib.util
    import os

    from aim.data.toy import make_toy_split, save_waterbirds_layout

    # Loaded from its path: benchmarks/ on sys.path would shadow tests/common.py with benchmarks/common.py.
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
