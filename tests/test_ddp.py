"""`aim train` under torchrun: 2 CPU processes (gloo) against one process with the same global
batch, and resume of a 2-process run killed with SIGKILL.

Why the baseline with --freeze-bn for the equivalence: DDP averages per-rank gradients, which
equals the one-process gradient only when each sample's loss does not depend on the rest of
its batch. BatchNorm in training mode normalizes with per-rank batch statistics
(SyncBatchNorm, which would share them, runs only on GPUs), so BatchNorm is frozen to its
running statistics. AIM is not batch-separable either: its mask loss (r_l - tau)^2 is a square
of a batch mean, and each rank draws its own Gumbel noise; so AIM under DDP is checked for
exact resume, not for equality with one process.
"""
import os
import signal
import subprocess
import sys

import pytest
import torch

from aim.app.cli import main
from aim.config import TrainConfig
from aim.checkpoint import build_model
from tiny_runs import TINY, read_log, wait_for_first_checkpoint


def torchrun(*args):
    """``torchrun --standalone --nproc-per-node 2 -m aim ARGS`` (the same as ``torchrun
    --no-python ... aim ARGS`` with the console script)."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "aim", *map(str, args)], cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def initial_weights(checkpoint):
    """The weights a run's rank 0 started from (fit seeds torch with --seed plus the rank)."""
    config = TrainConfig(**checkpoint["config"])
    torch.manual_seed(config.seed)
    return build_model(config, num_classes=2).state_dict()


def distance(a, b):
    """Euclidean distance between two state dicts' floating-point tensors."""
    return sum(float((a[k].double() - b[k].double()).square().sum()) for k in b if b[k].is_floating_point()) ** 0.5


def test_two_processes_equal_one_with_the_same_global_batch(waterbirds, tmp_path):
    args = ["train", "--data", waterbirds, "--model", "baseline", "--freeze-bn", "--epochs", "2", *TINY]
    out = finish(torchrun(*args, "--out", tmp_path / "ddp"))
    assert out.count("data: ") == 1  # rank 0 alone prints and writes
    assert main([str(a) for a in args] + ["--out", str(tmp_path / "single")]) == 0
    ddp, single = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("ddp", "single"))
    assert len(ddp["rng"]) == 2 and len(single["rng"]) == 1
    # Not element by element: the two ranks' gradients are summed in another order than one
    # batch's (float32 noise ~1e-6 of the largest gradient), and AdamW divides each element's
    # update by that element's own gradient scale, so an element whose gradient is at the noise
    # floor moves by up to +-lr either way. Measured on 2-core CPUs: the two runs' weights differ
    # by 0.3% of the distance training moved them; a run that differs in earnest (half the batch)
    # differs by 100%.
    moved = distance(single["model"], initial_weights(single))
    assert distance(ddp["model"], single["model"]) < 0.02 * moved
    for a, b in zip(read_log(tmp_path / "ddp"), read_log(tmp_path / "single")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)  # measured 3e-6 after the second epoch
        assert a["train_accuracy"] == b["train_accuracy"]  # reduced over ranks: every sample counted once
        assert a["val"]["group_accuracy"] == b["val"]["group_accuracy"]


def test_two_process_aim_run_resumes_exactly_after_sigkill(waterbirds, tmp_path):
    args = ["train", "--data", waterbirds, "--epochs", "3", *TINY]
    killed = tmp_path / "killed"
    proc = torchrun(*args, "--out", killed)
    wait_for_first_checkpoint(proc, killed)
    # torchrun starts each worker in a session of its own: kill the workers, then torchrun.
    workers = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert torch.load(killed / "last.pt", weights_only=True)["epoch"] < 3
    assert "resumed" in finish(torchrun(*args, "--out", killed, "--resume"))
    finish(torchrun(*args, "--out", tmp_path / "whole"))
    a, b = (torch.load(run / "last.pt", weights_only=True) for run in (killed, tmp_path / "whole"))
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
