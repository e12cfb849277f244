"""What a new user gets wrong, and what `aim` answers: one line naming the flag or the file,
exit status 2, no traceback, nothing written. Tiny runs (tests/test_train.py's TINY flags)."""
import csv
import json
import shutil

import numpy
import pytest
import torch
from PIL import Image

from aim.app.cli import build_parser, main
from tiny_datasets import write_metadata
from tiny_runs import TINY



def one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def train(waterbirds, run, *flags):
    return main(["train", "--data", str(waterbirds), "--out", str(run), "--epochs", "1", *TINY, *flags])


@pytest.mark.parametrize("flags, named", [
    (["--target", "-0.5"], "--target"),
    (["--target", "1.5"], "--target"),
    (["--depth", "9"], "--depth 9"),
    (["--depth", "0"], "--depth"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--backbone-lr", "-0.5"], "--backbone-lr"),
    (["--device", "tpu"], "--device"),
    (["--batch-size", "64"], "--batch-size 32 or less"),
])
def test_bad_setting_is_one_line_naming_the_flag(waterbirds, tmp_path, capsys, flags, named):
    run = tmp_path / "run"
    assert train(waterbirds, run, *flags) == 2
    assert named in one_line_error(capsys)
    assert not run.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu(waterbirds, tmp_path, capsys):
    assert train(waterbirds, tmp_path / "run", "--device", "cuda") == 2
    assert "--device cuda: no CUDA GPU" in one_line_error(capsys)


def test_out_naming_a_file(waterbirds, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    assert train(waterbirds, out) == 2
    assert f"--out {out}: is a file" in one_line_error(capsys)
    assert out.read_text() == "mine"


def test_train_help_shows_the_defaults():
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    text = train_parser.format_help()
    for default in ("(default: 32)", "(default: 0.001)", "(default: resnet50)", "(default: 0.25)", "(default: 10)"):
        assert default in " ".join(text.split()), default


@pytest.fixture(scope="module")
def trained(waterbirds, tmp_path_factory):
    """A 1-epoch run folder."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert train(waterbirds, run) == 0
    return run


def strict_json_lines(path):
    def refuse(constant):
        raise AssertionError(f"{path}: bare {constant} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_diverging_run_stops_and_keeps_the_last_finite_epoch(waterbirds, trained, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(waterbirds, run, "--lr", "1e6") == 2
    err = one_line_error(capsys)
    assert "--lr 1000000.0: training diverged in epoch 1" in err and "lower --lr" in err
    assert not (run / "best.pt").exists() and not (run / "last.pt").exists()
    assert strict_json_lines(run / "log.jsonl") == []
    # A checkpoint whose weights went non-finite (as runs before this check wrote) is refused.
    checkpoint = torch.load(trained / "best.pt", weights_only=True)
    next(t for t in checkpoint["model"].values() if t.is_floating_point()).fill_(float("nan"))
    torch.save(checkpoint, tmp_path / "nan.pt")
    assert main(["eval", str(tmp_path / "nan.pt"), "--data", str(waterbirds), "--workers", "0"]) == 2
    assert f"checkpoint {tmp_path / 'nan.pt'}: the weights hold NaN" in one_line_error(capsys)


@pytest.mark.parametrize("damage, reason", [("empty", "the file is empty (0 bytes)"),
                                            ("truncated", "cannot be read by torch.load")])
@pytest.mark.parametrize("command", ["eval", "explain"])
def test_damaged_checkpoint_names_the_file_as_given(waterbirds, trained, tmp_path, capsys, damage, reason, command):
    data = (trained / "best.pt").read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    image = next((waterbirds / "images").rglob("*.jpg"))
    args = ["--data", str(waterbirds), "--workers", "0"] if command == "eval" else [str(image), "--out", str(tmp_path / "x")]
    assert main([command, str(bad), *args]) == 2
    err = one_line_error(capsys)
    assert f"checkpoint {bad}: {reason}" in err and "--weights" not in err
    assert not (tmp_path / "x").exists()


def test_damaged_weights_file_names_weights(waterbirds, tmp_path, capsys):
    empty = tmp_path / "w.pt"
    empty.write_bytes(b"")
    assert train(waterbirds, tmp_path / "run", "--weights", str(empty)) == 2
    assert f"--weights {empty}: the file is empty" in one_line_error(capsys)


def copy_of(waterbirds, tmp_path):
    """A copy of the dataset to damage, and its metadata.csv rows (row i on line i + 2)."""
    data = tmp_path / "data"
    shutil.copytree(waterbirds, data)
    with open(data / "metadata.csv", newline="") as f:
        return data, list(csv.DictReader(f))


def test_conflicting_labels_of_one_image_name_both_lines(waterbirds, tmp_path, capsys):
    data, rows = copy_of(waterbirds, tmp_path)
    twin = {**rows[3], "y": 1 - int(rows[3]["y"])}
    write_metadata(data, rows + [twin])
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY]) == 2
    err = one_line_error(capsys)
    assert f"metadata.csv lines 5 and {len(rows) + 2}: {rows[3]['img_filename']} is listed with y = " in err
    assert not (tmp_path / "run").exists()


def test_decompression_bomb_names_the_file(waterbirds, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # every 32x32 image is then more than twice the limit
    assert main(["train", "--data", str(waterbirds), "--out", str(tmp_path / "run"), *TINY]) == 2
    err = one_line_error(capsys)
    assert "(metadata.csv line " in err and "cannot be read as an image (Image size (1024 pixels) exceeds limit" in err


def test_16_bit_png_keeps_its_values(tmp_path):
    from aim.data.transforms import load_image

    ramp = torch.arange(32 * 32, dtype=torch.int32).view(32, 32) * 60  # 0 .. 61380 of 65535
    Image.fromarray(ramp.numpy().astype("uint16")).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    image = torch.from_numpy(numpy.array(load_image(tmp_path / "deep.png"))).double()
    assert abs(image.mean().item() - (ramp.double() / 256).mean().item()) < 1  # not clipped to white (255)


def test_mask_of_another_aspect_ratio_is_refused(waterbirds, tmp_path, capsys):
    from aim.data.transforms import load_foreground

    data, rows = copy_of(waterbirds, tmp_path)
    val = next(r for r in rows if r["split"] == "1")
    mask = data / "segmentations" / (val["img_filename"][:-4] + ".png")
    Image.new("L", (64, 64), 255).save(mask)  # the same aspect ratio: resized to the image
    assert tuple(load_foreground(mask, (32, 32)).shape) == (1, 32, 32)
    Image.new("L", (40, 32), 255).save(mask)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--segmentations",
                 str(data / "segmentations"), *TINY]) == 2
    assert f"{mask}: the mask is 40x32, its image 32x32: another aspect ratio" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_resume_removes_the_temporaries_a_killed_run_left(waterbirds, tmp_path):
    run = tmp_path / "run"
    assert train(waterbirds, run) == 0
    stale = [run / "last.pt.tmp4242", run / "best.pt.tmp7", run / "log.jsonl.tmp99"]
    kept = [run / "last.pt.tmpcopy", run / "notes.tmp12", run / "mylast.pt.tmp5"]  # not names atomic_write gives
    for path in stale + kept:
        path.write_bytes(b"half")
    assert train(waterbirds, run, "--resume") == 0  # the run is complete: nothing to train, the folder tidied
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


@pytest.mark.parametrize("split", ["train", "val"])
def test_split_lacking_a_class(waterbirds, tmp_path, capsys, split):
    data, rows = copy_of(waterbirds, tmp_path)
    code = {"train": "0", "val": "1"}[split]
    write_metadata(data, [r for r in rows if r["split"] != code or r["y"] == "0"])
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY]) == 2
    assert f"the {split} split has no images of class waterbird" in one_line_error(capsys)


def test_run_too_short_to_reach_the_target_says_so(waterbirds, tmp_path, capsys):
    assert main(["train", "--data", str(waterbirds), "--out", str(tmp_path / "run"), *TINY, "--epochs", "1",
                 "--anneal-epochs", "3"]) == 0
    assert "note: tau reaches --target 0.25 in epoch 4" in capsys.readouterr().out
