"""What the end-to-end tests share: the flags of a tiny run (32x32 images, the SmallConvNet
backbone, one thread) and helpers to run `aim` in a fresh process and read a run folder."""
import json
import subprocess
import sys
import time

TINY = ["--backbone", "small_convnet", "--topdown-channels", "16", "--mask-channels", "8", "--image-size", "32",
        "--batch-size", "8", "--workers", "0", "--threads", "1", "--anneal-epochs", "1"]


def aim_process(*args, timeout=300, **kwargs):
    """``python -m aim ARGS`` in a fresh process, started outside the repository."""
    return subprocess.Popen([sys.executable, "-m", "aim", *map(str, args)], cwd=kwargs.pop("cwd", "/"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for_first_checkpoint(proc, run, timeout=240):
    """Poll until ``run/last.pt`` exists (the first epoch is done) while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while not (run / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
