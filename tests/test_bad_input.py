"""What a new user gets wrong, and what `aim` answers: one line naming the flag or the file,
exit status 2, no traceback, nothing written. Tiny runs (tests/test_train.py's TINY flags)."""
import json
import os

import pytest
import torch

from aim.cli import build_parser, main
from tiny_datasets import make_waterbirds

TINY = ["--backbone", "small_convnet", "--topdown-channels", "16", "--mask-channels", "8", "--image-size", "32",
        "--batch-size", "8", "--workers", "0", "--threads", "1", "--anneal-epochs", "1"]


@pytest.fixture(scope="module")
def waterbirds(tmp_path_factory):
    root = tmp_path_factory.mktemp("waterbirds")
    make_waterbirds(str(root))
    return root


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
    (["--backbone-lr", "0"], "--backbone-lr"),
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
