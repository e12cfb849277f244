"""`aim train` and `aim eval` end to end on tiny generated datasets in both layouts: outputs,
selection on val, bad data, weights, exact resume after SIGKILL, 2-process DDP, bf16 autocast,
channels_last and torch.compile.

Runs are tiny (32x32 images, 32 training images, the SmallConvNet backbone, 1-3 epochs). Most
run in this process through ``aim.app.cli.main``; those that must be separate processes (SIGKILL,
torchrun, the no-traceback check) run ``python -m aim`` from a temporary folder, so they use
the installed package (or PYTHONPATH during development), not the source tree by accident.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from aim.app.cli import main
from tiny_datasets import make_folders, write_metadata
from tiny_runs import TINY, aim_process, read_log, wait_for_first_checkpoint

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    make_folders(str(root))
    return root


def test_waterbirds_train_and_eval(waterbirds_dataset, tmp_path, capsys):
    root, _ = waterbirds_dataset
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(run), "--segmentations", str(root / "segmentations"),
                 "--epochs", "2", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "32 train / 16 val images, 2 classes, 4 groups" in printed
    assert printed.count("epoch ") >= 2 and "worst group" in printed
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "aim" and config["epochs"] == 2 and {"version", "git_commit", "torch"} <= set(config)
    log = read_log(run)
    assert [row["epoch"] for row in log] == [1, 2] and [row["tau"] for row in log] == [1.0, 0.25]
    for row in log:
        assert set(row) >= {"loss", "train_accuracy", "lr", "tau", "mask_active_fraction", "val", "time_s"}
        assert set(row["mask_active_fraction"]) == {"2", "3"} and set(row["val"]["energy_pointing_game"]) == {"2", "3"}
    # best.pt: the best val worst-group accuracy among the epochs at the target tau (the first on ties).
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["epoch"] == -max((row["val"]["worst_group_accuracy"], -row["epoch"]) for row in log if row["tau"] == 0.25)[1]
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"

    out = tmp_path / "eval.json"
    assert main(["eval", str(run / "last.pt"), "--data", str(root), "--split", "test", "--segmentations",
                 str(root / "segmentations"), "--json", str(out), "--workers", "0"]) == 0
    assert "worst-group accuracy" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["num_samples"] == 16 and len(result["group_accuracy"]) == 4
    present = [a for a in result["group_accuracy"] if a is not None]
    assert result["worst_group_accuracy"] == min(present)
    assert result["mean_group_accuracy"] == pytest.approx(sum(present) / len(present))
    # Weighted accuracy: the group accuracies weighted by the training split's group counts.
    counts = torch.load(run / "last.pt", weights_only=True)["train_group_counts"]
    assert sum(counts) == 32 and len(counts) == 4
    weighted = [(a, c) for a, c in zip(result["group_accuracy"], counts) if a is not None and c]
    assert result["weighted_accuracy"] == pytest.approx(sum(a * c for a, c in weighted) / sum(c for _, c in weighted))
    assert set(result["mask_active_fraction"]) == {"2", "3"}
    assert set(result["energy_pointing_game"]) == {"2", "3", "gradcam"}
    assert all(0 <= v <= 1 for v in result["energy_pointing_game"].values())


def test_folders_baseline_train_and_eval(folders, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(folders), "--out", str(run), "--model", "baseline", "--epochs", "1", *TINY]) == 0
    assert "2 classes" in capsys.readouterr().out
    row = read_log(run)[0]
    assert row["tau"] is None and row["val"]["worst_group_accuracy"] is None
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["class_names"] == ["disk", "plus"] and best["has_groups"] is False
    out = tmp_path / "eval.json"
    assert main(["eval", str(run / "best.pt"), "--data", str(folders), "--split", "val", "--json", str(out), "--workers", "0"]) == 0
    result = json.loads(out.read_text())
    assert result["group_accuracy"] is None and result["worst_group_accuracy"] is None
    assert len(result["class_accuracy"]) == 2 and "mask_active_fraction" not in result
    assert result["accuracy"] == pytest.approx(row["val"]["accuracy"])  # the same model and split as the log's


def _copy(root, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    return copy


def _bad_waterbirds(case, root, rows):
    rows = [dict(r) for r in rows]
    if case == "missing column":
        write_metadata(root, rows, columns=["img_id", "img_filename", "y", "split"])
        return "missing column place"
    if case == "label out of range":
        rows[5]["y"] = 2
        write_metadata(root, rows)
        return "line 7: y = 2 is out of range (0..1)"
    if case == "missing image":
        os.remove(root / rows[3]["img_filename"])
        return f"{rows[3]['img_filename']} (metadata.csv line 5): cannot be read as an image (no such file)"
    if case == "corrupt image":
        path = root / rows[4]["img_filename"]
        path.write_bytes(path.read_bytes()[:200])  # a truncated JPEG
        return f"{rows[4]['img_filename']} (metadata.csv line 6): cannot be read as an image"
    if case == "empty split":
        write_metadata(root, [r for r in rows if r["split"] != 1])
        return "the val split (split = 1) has no rows"
    if case == "class names that disagree":
        for r in rows:
            r["class_name"] = ("disk", "plus")[r["y"]]
        rows[6]["class_name"] = "square"
        write_metadata(root, rows)
        return f"line 8: class_name 'square' differs from '{('disk', 'plus')[rows[6]['y']]}' given for the same class {rows[6]['y']}"
    if case == "raw preprocessing, image of another size":
        from PIL import Image

        Image.new("RGB", (40, 32)).save(root / rows[2]["img_filename"])
        return f"{rows[2]['img_filename']} (metadata.csv line 4): the image is 40x32; preprocessing 'raw' uses images as they are"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing column", "label out of range", "missing image", "corrupt image", "empty split",
                                  "class names that disagree", "raw preprocessing, image of another size"])
def test_bad_waterbirds_data_stops_before_training(waterbirds_dataset, tmp_path, capsys, case):
    root, rows = waterbirds_dataset
    data = _copy(root, tmp_path)
    message = _bad_waterbirds(case, data, rows)
    run = tmp_path / "run"
    preprocessing = ["--preprocessing", "raw"] if case.startswith("raw") else []
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", *TINY, *preprocessing]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("aim train: error: ")
    assert not run.exists()  # nothing half-written


def test_missing_foreground_mask_stops_before_training(waterbirds_dataset, tmp_path, capsys):
    root, rows = waterbirds_dataset
    data = _copy(root, tmp_path)
    val = next(r for r in rows if r["split"] == 1)
    mask = data / "segmentations" / (val["img_filename"][:-4] + ".png")
    mask.unlink()
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--segmentations", str(data / "segmentations"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{mask} (foreground of {data / val['img_filename']}): cannot be read as a mask" in err
    assert not run.exists()


@pytest.mark.parametrize("case", ["unknown val class", "empty split", "corrupt image"])
def test_bad_folder_data_stops_before_training(folders, tmp_path, capsys, case):
    data = _copy(folders, tmp_path)
    if case == "unknown val class":
        shutil.copytree(data / "val" / "disk", data / "val" / "square")
        message = "class 'square' is not among the 2 classes"
    elif case == "empty split":
        for image in (data / "val").rglob("*.png"):
            image.unlink()
        message = "the val split has no images"
    else:
        image = sorted((data / "train" / "plus").glob("*.png"))[1]
        image.write_bytes(b"not an image")
        message = f"{image}: cannot be read as an image (not an image file PIL knows)"
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not run.exists()


def test_bad_data_in_a_fresh_process_prints_one_line_and_no_traceback(waterbirds_dataset, tmp_path):
    root, rows = waterbirds_dataset
    data = _copy(root, tmp_path)
    message = _bad_waterbirds("label out of range", data, rows)
    proc = aim_process("train", "--data", data, "--out", tmp_path / "run", *TINY)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err and err.strip().count("\n") == 0 and message in err
    assert not (tmp_path / "run").exists()


def test_existing_run_is_not_overwritten_without_resume(waterbirds_dataset, tmp_path, capsys):
    root, _ = waterbirds_dataset
    args = ["train", "--data", str(root), "--out", str(tmp_path), "--epochs", "1", *TINY]
    assert main(args) == 0
    before = (tmp_path / "last.pt").read_bytes()
    assert main(args) == 2 and "pass --resume" in capsys.readouterr().err
    assert main(args[:-len(TINY)] + [*TINY, "--lr", "0.5", "--resume"]) == 2 and "--lr 0.001 -> 0.5" in capsys.readouterr().err
    assert (tmp_path / "last.pt").read_bytes() == before


def test_resume_after_sigkill_ends_bit_identical(waterbirds_dataset, tmp_path):
    """A real process killed with SIGKILL as soon as its first checkpoint is on disk (so in
    epoch 2, or between epochs), then resumed, must end with exactly the weights, optimizer
    state and log of an uninterrupted run."""
    root, _ = waterbirds_dataset
    args = ["train", "--data", str(root), "--epochs", "3", *TINY]
    killed = tmp_path / "killed"
    proc = aim_process(*args, "--out", killed)
    wait_for_first_checkpoint(proc, killed)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(killed / "last.pt", weights_only=True)["epoch"] < 3  # really cut short
    resumed = aim_process(*args, "--out", killed, "--resume")
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    assert "resumed" in out

    uninterrupted = tmp_path / "uninterrupted"
    whole = aim_process(*args, "--out", uninterrupted)
    out, err = whole.communicate(timeout=240)
    assert whole.returncode == 0, err
    a, b = (torch.load(run / "last.pt", weights_only=True) for run in (killed, uninterrupted))
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time_s", "train_images_per_s")} for r in rows]  # noqa: E731
    assert strip(read_log(killed)) == strip(read_log(uninterrupted))


def test_loader_workers_do_not_change_the_result(waterbirds_dataset, tmp_path):
    """Each sample's augmentation is seeded by (seed, epoch, index), so decoding in 2 worker
    processes trains exactly as decoding in this one does."""
    root, _ = waterbirds_dataset
    args = ["train", "--data", str(root), "--epochs", "1", *TINY]
    assert main(args + ["--out", str(tmp_path / "inline")]) == 0
    assert main(args + ["--out", str(tmp_path / "workers"), "--workers", "2"]) == 0
    a, b = (torch.load(tmp_path / run / "last.pt", weights_only=True)["model"] for run in ("inline", "workers"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_progress_bar_on_a_terminal_only(waterbirds_dataset, tmp_path, capsys):
    """A tqdm bar with running loss and images/s when stdout is a terminal (a pseudo-terminal
    here); none when it is not (the in-process runs above print only the summary lines)."""
    import fcntl
    import pty
    import struct
    import termios

    root, _ = waterbirds_dataset
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
    # Redraw on every step: a fast epoch otherwise ends within tqdm's 0.1 s refresh interval, showing only "0%".
    env = {**os.environ, "TQDM_MININTERVAL": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "aim", "train", "--data", str(root), "--out", str(tmp_path / "tty"),
                             "--epochs", "1", *TINY], cwd="/", stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 0, output
    text = output.decode()
    assert "epoch 1/1: 100%" in text and "img_s=" in text and "loss=" in text
    assert text.rstrip().endswith("best epoch 1")  # the bar was cleared; the summary line stays

    assert main(["train", "--data", str(root), "--out", str(tmp_path / "pipe"), "--epochs", "1", *TINY]) == 0
    captured = capsys.readouterr()
    assert "it/s" not in captured.out + captured.err and "epoch 1/1 | loss" in captured.out


def test_backbone_frozen_epochs_leave_the_backbone_weights_and_train_the_rest(waterbirds_dataset, tmp_path):
    from aim.config import TrainConfig
    from aim.checkpoint import build_model

    root, _ = waterbirds_dataset
    runs = {}
    for frozen in (1, 0):
        run = tmp_path / f"frozen{frozen}"
        assert main(["train", "--data", str(root), "--out", str(run), "--epochs", "1", "--backbone-frozen-epochs",
                     str(frozen), *TINY]) == 0
        runs[frozen] = torch.load(run / "last.pt", weights_only=True)
    torch.manual_seed(runs[1]["config"]["seed"])  # fit seeds torch with --seed (rank 0) before building the model
    initial = build_model(TrainConfig(**runs[1]["config"]), num_classes=2).state_dict()
    weights = [k for k in initial if k.startswith("backbone.") and "running" not in k and "num_batches" not in k]
    assert weights and all(torch.equal(runs[1]["model"][k], initial[k]) for k in weights)
    assert not all(torch.equal(runs[0]["model"][k], initial[k]) for k in weights)  # unfrozen: the backbone moves
    head = [k for k in initial if not k.startswith("backbone.") and initial[k].is_floating_point()]
    assert not all(torch.equal(runs[1]["model"][k], initial[k]) for k in head)


@pytest.mark.parametrize("budget", ["eval", "fixed"])
def test_fixed_mask_budget_follows_the_annealed_tau_and_eval_masks_keep_it(waterbirds_dataset, tmp_path, budget):
    root, _ = waterbirds_dataset
    run = tmp_path / budget
    assert main(["train", "--data", str(root), "--out", str(run), "--epochs", "2", "--mask-budget", budget,
                 "--target", "0.3", *TINY]) == 0
    log = read_log(run)
    assert [row["tau"] for row in log] == [1.0, 0.3]
    assert torch.load(run / "last.pt", weights_only=True)["model"]["topdown.active_fraction"].item() == pytest.approx(0.3)
    for stage in log[1]["val"]["mask_area_leak"].values():  # exactly round(0.3 * positions) in every image
        assert stage["empty_share"] == 0.0 and stage["auc_class"] == 0.5
