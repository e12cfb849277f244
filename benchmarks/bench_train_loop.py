"""Training throughput of `aim train`'s loop (aim.app.train.fit) against a minimal hand-written loop
over the same model and data, the data loader alone, and the glibc malloc setting that
`aim train` could apply at start-up (aim.app.train.keep_freed_memory).

    python benchmarks/bench_train_loop.py [--quick] [--threads 1]

Data: the embedded generator written in the WaterBirds layout (JPEG, 64x64), read through
aim.data like any dataset. Model: AIM[2, 0.25] on the 4-stage SmallConvNet (the demo's model),
batch 32, one torch thread. Per process, in interleaved rounds:
- fit: aim.app.train.fit (DataLoader with --workers 0 and 1, transforms, per-sample seeding,
  checkpoints) -- images/s of its training epochs after the first (the log's
  train_images_per_s: the training part of the epoch, without the val pass);
- minimal: the same model, optimizer and loss over images decoded and transformed once and
  held in memory: forward, AIMLoss, backward, AdamW step, nothing else;
- loader: the training DataLoader alone (decode, augment, collate), no model;
- minimal resnet18: minimal steps of a larger model (AIM[2] on ResNet-18, 8 images of 160x160),
  whose multi-MB tensors are where glibc's default page-faults.
Processes alternate between the default malloc and keep_freed_memory() at start
(the allocator only applies from process start). Also fit on the generator's in-memory
tensors (no decoding): the loop's own overhead against the minimal loop. Writes benchmarks/results/train_loop[_quick].{json,csv}.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CHILD_FLAG = "AIM_BENCH_TRAIN_LOOP_CHILD"


def settings(quick):
    return dict(train=128 if quick else 512, image_size=64, batch=32, epochs=2 if quick else 3, rounds=1 if quick else 2)


def make_data(root, s):
    from aim.data import make_toy_split
    from aim.data.toy import save_waterbirds_layout

    splits = {"train": make_toy_split(s["train"], s["image_size"], 0.9, seed=0),
              "val": make_toy_split(64, s["image_size"], 0.5, seed=1)}
    save_waterbirds_layout(root, splits)


def keep_freed_memory():
    """What `aim` would do at start-up, were it worth it: glibc malloc serves large blocks from
    the heap and keeps freed memory (mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD at 2 GiB - 1),
    instead of a fresh mmap, page-faulted in on first touch, for every large tensor."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold, limit = -1, -3, 2**31 - 1
    return bool(libc.mallopt(m_mmap_threshold, limit)) and bool(libc.mallopt(m_trim_threshold, limit))


def child(root, quick, allocator, threads):
    if allocator == "keep-freed-memory":
        assert keep_freed_memory()
    import aim
    from aim.data import SeededSampler, make_toy_split, open_split
    from aim.config import SMALL_BACKBONE, TrainConfig
    from aim.checkpoint import build_model
    from aim.app.train import fit, make_optimizer

    torch.set_num_threads(threads)
    s = settings(quick)
    train = open_split(root, "train", s["image_size"], augment=True)
    val = open_split(root, "val", s["image_size"])
    base = dict(model="aim", backbone=SMALL_BACKBONE, topdown_channels=64, mask_channels=32, image_size=s["image_size"],
                batch_size=s["batch"], epochs=s["epochs"], anneal_epochs=1, threads=threads)
    rates = {"fit workers=0": [], "fit workers=1": [], "fit in-memory": [], "minimal": [], "loader workers=0": [],
             "minimal resnet18 160px batch 8": []}
    in_memory = make_toy_split(s["train"], s["image_size"], 0.9, seed=0).as_dataset()
    for _ in range(s["rounds"]):
        for workers in (0, 1):
            with tempfile.TemporaryDirectory() as out:
                _, history = fit(TrainConfig(out=out, workers=workers, **base), train, val, log=lambda *a: None)
            rates[f"fit workers={workers}"] += [row["train_images_per_s"] for row in history[1:]]
        with tempfile.TemporaryDirectory() as out:
            _, history = fit(TrainConfig(out=out, workers=0, **base), in_memory, val, log=lambda *a: None)
        rates["fit in-memory"] += [row["train_images_per_s"] for row in history[1:]]

        # The minimal loop: one fixed augmentation of every image, held in memory.
        items = [train[(i, i)] for i in range(len(train))]
        images, labels = torch.stack([x[0] for x in items]), torch.stack([x[1] for x in items])
        torch.manual_seed(0)
        config = TrainConfig(out="", **base)
        model = build_model(config, 2)
        optimizer, criterion = make_optimizer(config, model), aim.AIMLoss()
        model.train()
        for epoch in range(s["epochs"]):
            order = torch.randperm(len(labels))
            started = time.perf_counter()
            seen = 0
            for start in range(0, len(labels) - s["batch"] + 1, s["batch"]):
                index = order[start:start + s["batch"]]
                loss = criterion(model(images[index]), labels[index], 0.5).total
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seen += len(index)
            if epoch:
                rates["minimal"].append(seen / (time.perf_counter() - started))

        rates["minimal resnet18 160px batch 8"].append(large_model_rate(quick))

        loader = torch.utils.data.DataLoader(train, batch_size=s["batch"], sampler=SeededSampler(train, 1, 0, seed=0), drop_last=True)
        started, seen = time.perf_counter(), 0
        for batch in loader:
            seen += batch[0].shape[0]
        rates["loader workers=0"].append(seen / (time.perf_counter() - started))
    print(json.dumps({k: statistics.median(v) for k, v in rates.items()}))


def large_model_rate(quick):
    """Images/s of minimal training steps of AIM[2] on ResNet-18, 8 images of 160x160: tensors
    of several MB, where the allocator setting matters (random images: only speed is measured)."""
    import aim

    torch.manual_seed(0)
    model = aim.AIM("resnet18", num_classes=2, depth=2).train()
    optimizer, criterion = torch.optim.AdamW(model.parameters(), lr=1e-4), aim.AIMLoss()
    images, labels = torch.randn(8, 3, 160, 160), torch.randint(0, 2, (8,))
    times = []
    for step in range(3 if quick else 8):
        started = time.perf_counter()
        loss = criterion(model(images), labels, 0.5).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 1:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - started)
    return 8 / statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, epochs and processes, for a smoke run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--processes", type=int, default=0, help="processes per allocator setting (default 3, quick 1)")
    args = parser.parse_args()
    processes = args.processes or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory() as root:
        make_data(root, settings(args.quick))
        results = {"default-malloc": [], "keep-freed-memory": []}
        for _ in range(processes):  # alternate, so load on the machine hits both alike
            for allocator in results:
                env = dict(os.environ, **{CHILD_FLAG: "1"})
                proc = subprocess.run([sys.executable, __file__, root, allocator, str(int(args.quick)), str(args.threads)],
                                      env=env, capture_output=True, text=True)
                if proc.returncode:
                    sys.stderr.write(proc.stderr)
                    raise SystemExit("child failed")
                results[allocator].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = []
    for allocator, runs in results.items():
        for what in runs[0]:
            values = [r[what] for r in runs]
            rows.append({"allocator": allocator, "what": what, "threads": args.threads, "images_per_s": statistics.median(values),
                         "min": min(values), "max": max(values), "processes": len(values)})
    minimal = {r["allocator"]: r["images_per_s"] for r in rows if r["what"] == "minimal"}
    for r in rows:
        r["fraction_of_minimal"] = r["images_per_s"] / minimal[r["allocator"]]
        r["keep_freed_over_default"] = (next(x["images_per_s"] for x in rows if x["what"] == r["what"] and x["allocator"] == "keep-freed-memory")
                                        / next(x["images_per_s"] for x in rows if x["what"] == r["what"] and x["allocator"] == "default-malloc"))
    common.print_table(rows, ["allocator", "what", "images_per_s", "min", "max", "fraction_of_minimal", "keep_freed_over_default"])
    meta = {**common.machine_info(), "settings": settings(args.quick)}
    print("wrote", *common.write_results("train_loop" + ("_quick" if args.quick else ""), rows, meta))


if __name__ == "__main__":
    if os.environ.get(CHILD_FLAG):
        child(sys.argv[1], bool(int(sys.argv[3])), sys.argv[2], int(sys.argv[4]))
    else:
        main()
