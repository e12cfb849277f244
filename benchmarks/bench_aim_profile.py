"""Where AIM's time goes, per module, against the plain classifier: torch.profiler over a
training step (forward, loss, backward, AdamW step) and an eval-mode inference forward.

    python benchmarks/bench_aim_profile.py [--quick] [--backbones NAME ...] [--threads 1] [--switches-off]
    python benchmarks/bench_aim_profile.py --print benchmarks/results/aim_profile.json

Every module of interest runs inside a ``record_function`` scope opened by forward hooks
(backbone, each mask estimator, each lateral conv, the classifier heads); the fused
``aim_kernels`` ops are their own row wherever they are called; loss and optimizer step are
scopes of the step itself. Backward time goes to the module whose forward created the autograd
node: the profiler records each op's ``sequence_nr`` in forward and in the
``autograd::engine::evaluate_function`` event of its node. Every op's self time is charged to
the innermost scope around it, so the rows add up to the profiled step.

The profiled times carry the profiler's overhead; the ``wall`` columns are the same steps
timed without it, AIM and plain interleaved in one process (common.time_interleaved).
Writes benchmarks/results/aim_profile[_quick].{json,csv}.
"""
import argparse
import json
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_aim_speedups import with_switches_off  # noqa: E402
from bench_backbones import inference, train_step  # noqa: E402

import aim  # noqa: E402
from aim.nn.backbones import build_backbone  # noqa: E402
from aim.nn.topdown import MASK_ESTIMATORS  # noqa: E402
from aim.app.profiling import plain_classifier  # noqa: E402

CASES = (("resnet18", 160), ("convnext_tiny", 224))
SETTINGS = dict(batch=8, depth=2, num_classes=2, rounds=7, profiled_steps=2)
QUICK = dict(SETTINGS, batch=2, rounds=2, profiled_steps=1, image_size=64)
SCOPE = "aim_profile::"
FUSED_PREFIX = "aim_kernels::"  # the torch.library namespace of the fused ops
OTHER = "other (pathway glue: cat, upsampling, pooling)"


def _label_modules(model, is_aim):
    """(module, label) pairs whose forward runs inside a scope of that label."""
    if not is_aim:
        heads = ("avgpool", "fc", "classifier")
        return [(m, "heads (pool + classifiers)" if n in heads else "backbone") for n, m in model.named_children()]
    td = model.topdown
    pairs = [(model.backbone, "backbone"), (model.classifier, "heads (pool + classifiers)")]
    pairs += [(m, "heads (pool + classifiers)") for m in model.stage_classifiers]
    n = td.depth
    for i in range(n):
        stage = f"stage -{n - i}"  # -1: the coarsest stage
        est = td.mask_estimators[i]
        pairs += [(est.stem, f"mask estimator {stage}: stem conv"), (est.blocks, f"mask estimator {stage}: residual blocks"),
                  (est, f"mask estimator {stage}: rest (pool branch, 1x1 logit; eval: the folded convs)")]
        pairs.append((td.lateral[i], f"lateral 1x1 conv {stage}"))
    return pairs


class ModuleScopes:
    """Forward hooks that open a record_function scope per labelled module."""

    def __init__(self, pairs):
        self.handles = []
        for module, label in pairs:
            self.handles.append(module.register_forward_pre_hook(self._enter(label)))
            self.handles.append(module.register_forward_hook(self._exit))
        self.stack = []

    def _enter(self, label):
        def hook(module, args):
            scope = record_function(SCOPE + label)
            scope.__enter__()
            self.stack.append(scope)
        return hook

    def _exit(self, module, args, output):
        self.stack.pop().__exit__(None, None, None)

    def remove(self):
        for h in self.handles:
            h.remove()


def _category(event, inherited):
    name = event.name
    if name.startswith(SCOPE):
        return name[len(SCOPE):]
    if name.startswith(FUSED_PREFIX):
        return "fused ops (aim_kernels)"
    return inherited


def attribute(events):
    """ms of self CPU time per category, over a profile's event tree."""
    forward_category = {}
    totals = defaultdict(float)
    children = {id(e): e.cpu_children for e in events}
    roots = [e for e in events if e.cpu_parent is None]

    def walk(event, category):
        category = _category(event, category)
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::engine") and category is not None:
            forward_category.setdefault((event.sequence_nr, event.thread), category)
        for child in children[id(event)]:
            walk(child, category)

    for root in roots:
        walk(root, None)

    def charge(event, category):
        category = _category(event, category)
        totals[category or OTHER] += event.self_cpu_time_total / 1e3
        for child in children[id(event)]:
            charge(child, category)

    for root in roots:
        if root.name.startswith("autograd::engine::evaluate_function"):
            if "AccumulateGrad" in root.name:
                category = "backward: gradient accumulation"
            else:
                fwd = forward_category.get((root.sequence_nr, root.fwd_thread))
                category = ("backward: " + fwd) if fwd else "backward: other"
            charge(root, category)
        else:
            charge(root, None)
    return dict(totals)


def _merge_backward(times):
    """Forward and backward of the same module in one row: {module: (fwd_ms, bwd_ms)}."""
    rows = defaultdict(lambda: [0.0, 0.0])
    for category, ms in times.items():
        if category.startswith("backward: "):
            rows[category[len("backward: "):]][1] += ms
        else:
            rows[category][0] += ms
    return rows


def profile_step(fn, pairs, steps):
    scopes = ModuleScopes(pairs)
    try:
        fn()  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                fn()
    finally:
        scopes.remove()
    return {k: v / steps for k, v in attribute(prof.events()).items()}


def train_step_scoped(model, images, labels, is_aim):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = aim.AIMLoss()

    def step():
        output = model(images)
        with record_function(SCOPE + "loss"):
            loss = criterion(output, labels, 0.25).total if is_aim else torch.nn.functional.cross_entropy(output, labels)
        with record_function(SCOPE + "optimizer (zero_grad + AdamW step)"):
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with record_function(SCOPE + "optimizer (zero_grad + AdamW step)"):
            optimizer.step()
    return step


def measure(name, image_size, s, switches_off=False, mask_estimator="dense"):
    torch.manual_seed(0)
    model = aim.AIM(build_backbone(name, stages_used=s["depth"]), num_classes=s["num_classes"], depth=s["depth"],
                    mask_estimator=mask_estimator)
    if switches_off:  # the mask estimators' inference speed switches (bench_aim_speedups.py): as before them
        model = with_switches_off(model)
    models = {"aim": model, "plain": plain_classifier(name, s["num_classes"], image_size)}
    images = torch.randn(s["batch"], 3, image_size, image_size)
    labels = torch.randint(0, s["num_classes"], (s["batch"],))
    rows = []
    for mode in ("train step", "inference"):
        steps, profiled = {}, {}
        for kind, model in models.items():
            model.train(mode == "train step")
            if mode == "train step":
                steps[kind] = train_step(model, images, labels, kind == "aim")
                scoped = train_step_scoped(model, images, labels, kind == "aim")
            else:
                steps[kind] = scoped = inference(model, images)
            profiled[kind] = _merge_backward(profile_step(scoped, _label_modules(model, kind == "aim"), s["profiled_steps"]))
        wall = common.time_interleaved(steps, rounds=s["rounds"], warmup=1)
        for kind in models:
            total = sum(f + b for f, b in profiled[kind].values())
            for module, (fwd, bwd) in sorted(profiled[kind].items(), key=lambda kv: -sum(kv[1])):
                rows.append({"backbone": name, "image_size": image_size, "batch": s["batch"], "mode": mode, "model": kind,
                             "module": module, "forward_ms": fwd, "backward_ms": bwd, "total_ms": fwd + bwd,
                             "share_of_profiled": (fwd + bwd) / total,
                             "wall_ms": wall[kind]["median_ms"], "wall_aim_over_plain": wall["aim"]["median_ms"] / wall["plain"]["median_ms"]})
    return rows


def print_profile(rows):
    """Markdown tables, one per backbone and mode: per module its profiled forward and backward
    ms, its share of the model's profiled step, and its ms over the plain model's profiled step
    (the ratio AIM's rows add up to, steadier on a loaded machine than the wall-clock ratio,
    which is printed above each table)."""
    for key in sorted({(r["backbone"], r["image_size"], r["mode"]) for r in rows}, key=lambda k: (k[0], k[2] != "train step")):
        group = [r for r in rows if (r["backbone"], r["image_size"], r["mode"]) == key]
        wall = {r["model"]: r["wall_ms"] for r in group}
        plain_total = sum(r["total_ms"] for r in group if r["model"] == "plain")
        aim_total = sum(r["total_ms"] for r in group if r["model"] == "aim")
        print(f"\n{key[0]}@{key[1]} {key[2]}, batch {group[0]['batch']}: profiled plain {plain_total:.0f} ms, AIM {aim_total:.0f} ms "
              f"(AIM/plain {aim_total / plain_total:.3f}); wall plain {wall['plain']:.0f} ms, AIM {wall['aim']:.0f} ms "
              f"(AIM/plain {wall['aim'] / wall['plain']:.3f})")
        shared = {r["module"] for r in group if r["model"] == "plain"}
        own = sum(r["total_ms"] for r in group if r["model"] == "aim" and r["module"] not in shared)
        print(f"AIM's own modules (rows the plain model has not) / plain step: {own / plain_total:.3f}\n")
        print("| model | module | fwd ms | bwd ms | share of its step | / plain step |")
        print("|---|---|---:|---:|---:|---:|")
        for r in group:
            print(f"| {r['model']} | {r['module']} | {r['forward_ms']:.1f} | {r['backward_ms']:.1f} | "
                  f"{r['share_of_profiled']:.1%} | {r['total_ms'] / plain_total:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 2 at 64x64, for a smoke run")
    parser.add_argument("--backbones", nargs="+", default=[n for n, _ in CASES], metavar="NAME",
                        help="of %(default)s (each at its image size)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1, as bench_backbones.py)")
    parser.add_argument("--switches-off", action="store_true",
                        help="profile AIM with the mask estimators' speed switches off (the computation before them)")
    parser.add_argument("--mask-estimator", default="dense", choices=MASK_ESTIMATORS, help="AIM's mask_estimator")
    parser.add_argument("--print", metavar="RESULTS_JSON", help="only print the tables of a results file this script wrote")
    args = parser.parse_args()
    if args.print:
        with open(args.print) as f:
            return print_profile(json.load(f)["rows"])
    common.restart_without_allocation_faults()
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else SETTINGS
    sizes = dict(CASES)
    rows = []
    for name in args.backbones:
        rows += measure(name, s.get("image_size", sizes.get(name, 224)), s, args.switches_off, args.mask_estimator)
    print_profile(rows)
    meta = {**common.machine_info(), "settings": s, "switches_off": args.switches_off, "mask_estimator": args.mask_estimator,
            "env": {k: os.environ.get(k) for k in common.ALLOCATOR_SETTINGS["no-alloc-faults"]}}
    print("wrote", *common.write_results("aim_profile" + ("_switches_off" if args.switches_off else "")
                                     + ("" if args.mask_estimator == "dense" else f"_{args.mask_estimator}")
                                     + ("_quick" if args.quick else ""), rows, meta))


if __name__ == "__main__":
    main()
