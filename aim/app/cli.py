"""The `aim` command: train, evaluate and explain AIM on a dataset, run the demo and the kernel
benchmarks. Argument parsing and dispatch only; the work is in aim.app.train, aim.app.evaluate,
aim.app.explain, aim.app.report, aim.app.bench, aim.app.demo and aim.app.profiling."""
import argparse
import dataclasses
import json
import sys

from aim.app import study
from aim.config import TrainConfig, read_config_file


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help, unless its help already says it in its own words or
    there is none to say (a required option, an off switch, an unset path)."""

    def _get_help_string(self, action):
        if "default" in action.help or action.required or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def json_object(text):
    """An argument given as a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ({{\"name\": value, ...}}), got {text!r}")
    return value


def add_config_flags(parser, config_class, defaults):
    """One flag per field of the dataclass ``config_class`` (``--name-with-dashes``), in the
    argument group its metadata names, with its help, choices and metavar (aim.config.setting);
    the default is the field's, or ``defaults[name]`` (a --config file's). A field marked
    required is required unless ``defaults`` gives it."""
    groups = {}
    for field in dataclasses.fields(config_class):
        meta = dict(field.metadata)
        title, required = meta.pop("group"), meta.pop("required", False) and field.name not in defaults
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        flag, default = "--" + field.name.replace("_", "-"), defaults.get(field.name, field.default)
        if field.type is bool:
            action = argparse.BooleanOptionalAction if field.default else "store_true"
            group.add_argument(flag, action=action, default=default, **meta)
        else:
            group.add_argument(flag, type=json_object if field.type is dict else field.type, default=default,
                               required=required, **meta)


def add_task_flags(parser, task):
    """The embedded task's settings (aim.app.study.TaskSettings) that `aim demo` and `aim data
    embedded` share, with its defaults."""
    parser.add_argument("--spurious-correlation", type=float, default=task.spurious_correlation,
                        help="P(background == class) in training")
    parser.add_argument("--seed", type=int, default=task.seed, help="seeds the data and the training runs")
    parser.add_argument("--image-size", type=int, default=task.image_size, help="side of the square images")
    parser.add_argument("--train-size", type=int, default=task.train_size, help="images of the biased training split")
    parser.add_argument("--val-size", type=int, default=task.val_size, help="balanced: a multiple of 4")
    parser.add_argument("--test-size", type=int, default=task.test_size, help="balanced: a multiple of 4")
    parser.add_argument("--unseen-size", type=int, default=task.unseen_size, help="the unseen-scene test; balanced: a multiple of 4")


def build_parser(train_defaults=None):
    """The `aim` parser; ``train_defaults``: the settings of an ``aim train --config`` file."""
    parser = argparse.ArgumentParser(prog="aim", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train AIM or the baseline on a WaterBirds-layout or class-per-folder dataset",
                                formatter_class=DefaultsHelpFormatter,
                                description="Train on DIR (metadata.csv: WaterBirds layout; else DIR/train/<class>/, "
                                            "DIR/val/<class>/). Multi-process: torchrun --no-python --nproc-per-node K aim train ...")
    train.add_argument("--config", metavar="FILE",
                       help="a whole run's settings as JSON or YAML (TrainConfig's fields, e.g. a run's config.json); "
                            "flags given here override it")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    add_config_flags(train, TrainConfig, train_defaults or {})
    ev = commands.add_parser("eval", help="accuracy, group accuracies, mask fractions, pointing game of masks and GradCAM")
    ev.add_argument("checkpoint", metavar="CKPT")
    ev.add_argument("--data", required=True, metavar="DIR")
    ev.add_argument("--split", choices=("test", "val", "train"), default="test")
    ev.add_argument("--segmentations", metavar="DIR", help="foreground masks for the Energy Pointing Game")
    ev.add_argument("--json", metavar="FILE", help="write the metrics as JSON")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--workers", type=int, default=4)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--no-gradcam", action="store_true", help="skip GradCAM (one backward per batch)")

    ex = commands.add_parser("explain", help="PNG per image: each stage's mask and GradCAM overlaid, the prediction")
    ex.add_argument("checkpoint", metavar="CKPT")
    ex.add_argument("images", nargs="+", metavar="IMAGE")
    ex.add_argument("--out", required=True, metavar="DIR")
    ex.add_argument("--device", default="cpu")

    report = commands.add_parser("report", help="the audit of a run as one self-contained HTML page: groups, curves, "
                                                 "decision audit, leak check, explanation quality, mask galleries")
    report.add_argument("run", metavar="RUN_DIR", help="a run folder of `aim train` (best.pt, log.jsonl, config.json)")
    report.add_argument("--out", required=True, metavar="FILE", help="the HTML file to write (replaced in one rename)")
    report.add_argument("--data", metavar="DIR", help="the dataset (default: the one the run recorded)")
    report.add_argument("--split", choices=("test", "val", "train"), default="test")
    report.add_argument("--segmentations", metavar="DIR", help="foreground masks (default: DIR/segmentations)")
    report.add_argument("--baseline", metavar="RUN_DIR", help="a baseline run drawn beside: its numbers and GradCAM")
    report.add_argument("--checkpoint", choices=("best", "last"), default="best", help="best.pt (val-selected) or last.pt")
    report.add_argument("--gallery", type=int, default=6, help="images per group in the mask galleries")
    report.add_argument("--background-images", type=int, default=8,
                        help="images whose decision rests most on the background")
    report.add_argument("--faithfulness-images", type=int, default=25,
                        help="images per group for the deletion/insertion curves and the grid pointing game")
    report.add_argument("--steps", type=int, default=16, help="deletion/insertion steps")
    report.add_argument("--grids", type=int, default=32, help="grids of the grid pointing game (at most)")
    report.add_argument("--batch-size", type=int, default=64)
    report.add_argument("--workers", type=int, default=0)
    report.add_argument("--device", default="cpu")
    report.add_argument("--threads", type=int, default=0, help="torch intra-op CPU threads (0: torch's default)")

    bench = commands.add_parser("bench", help="run benchmarks/bench_*.py of a repository checkout, tables and a speedup plot")
    bench.add_argument("--quick", action="store_true", help="one small shape per benchmark (a smoke run)")
    bench.add_argument("--benchmarks", metavar="DIR", help="the benchmarks folder (default: ./benchmarks)")
    bench.add_argument("--out", default="aim_bench_out", metavar="DIR", help="where the CSV/JSON copies and speedups.png go")
    bench.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks (NAME: bench_NAME.py, e.g. backbones)")
    bench.add_argument("--backbones", nargs="+", metavar="NAME",
                       help="torchvision names or timm:NAME for bench_backbones.py (AIM's added parameters, FLOPs, "
                            "train-step and inference time against the plain classifier; default: its table's)")

    # The demo and `aim data embedded` take their defaults from the study's recipe and settings.
    recipe, task, pretrain, pathway = study.FINETUNE_DEFAULTS, study.TaskSettings(), study.PretrainSettings(), study.PathwaySettings()
    demo = commands.add_parser("demo", help="AIM vs the baseline under a spurious correlation on the embedded benchmark "
                                             "(pretraining, fine-tuning, test table, PNG of masks and GradCAM)",
                               formatter_class=DefaultsHelpFormatter)
    demo.add_argument("--out", default="aim_demo_out", help="output directory (summary.json, the PNG, the two runs)")
    add_task_flags(demo, task)
    demo.add_argument("--epochs", type=int, default=recipe["epochs"], help="fine-tuning epochs")
    demo.add_argument("--anneal-epochs", type=int, default=recipe["anneal_epochs"],
                      help="epochs over which tau goes from 1.0 to --target")
    demo.add_argument("--target", type=float, default=recipe["target"], help="mask-annealing target (fraction of active entries)")
    demo.add_argument("--depth", type=int, default=recipe["depth"], help="top-down stages (AIM[depth, target])")
    demo.add_argument("--lr", type=float, default=recipe["lr"], help="fine-tuning rate of the new layers")
    demo.add_argument("--backbone-lr", type=float, default=recipe["backbone_lr"],
                      help="fine-tuning rate of the pretrained backbone (default: --lr, the whole network fine-tuned)")
    demo.add_argument("--batch-size", type=int, default=recipe["batch_size"], help="fine-tuning batch")
    demo.add_argument("--pretrain-size", type=int, default=pretrain.train_size, help="images of the unbiased pretraining set")
    demo.add_argument("--pretrain-epochs", type=int, default=pretrain.epochs, help="epochs of the backbone's pretraining")
    demo.add_argument("--pathway-epochs", type=int, default=pathway.epochs,
                      help="epochs of AIM's pathway pretraining on the same images (AIM's lateral convolutions start "
                           "from it; 0: none)")
    demo.add_argument("--reference", action="store_true", help="use the plain-PyTorch reference ops instead of the fused ones")
    # One thread by default: this model's ops are small, so on a 2-core machine shared with other
    # work a second intra-op thread mostly waits at barriers (measured 7x slower steps under load).
    demo.add_argument("--threads", type=int, default=1, help="torch intra-op CPU threads (0: torch's default)")

    data = commands.add_parser("data", help="write a generated dataset to disk")
    data_kinds = data.add_subparsers(dest="kind", required=True)
    embedded = data_kinds.add_parser("embedded", help="the demo's task in the WaterBirds layout (metadata.csv, segmentations/, "
                                                       "unseen_scenes/), the same images `aim demo` trains and tests on",
                                     formatter_class=DefaultsHelpFormatter)
    embedded.add_argument("--out", required=True, metavar="DIR", help="folder to write (replaced if it holds a metadata.csv)")
    add_task_flags(embedded, task)

    profile = commands.add_parser("profile", help="parameters and FLOPs AIM adds to a torchvision or timm backbone")
    profile.add_argument("--backbone", default="convnext_tiny", metavar="NAME", help="a torchvision name or timm:NAME")
    profile.add_argument("--depth", type=int, default=2)
    profile.add_argument("--image-size", type=int, default=224)
    profile.add_argument("--num-classes", type=int, default=2)
    return parser


def config_file_settings(argv):
    """The settings of ``aim train --config FILE``, read before the parser is built (they become
    its defaults, so the flags override them and a file's --data satisfies the required flag)."""
    if argv[:1] != ["train"]:
        return None
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    config = first.parse_known_args(argv[1:])[0].config
    return read_config_file(config) if config else None


def main(argv=None):
    from aim.errors import UsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(config_file_settings(argv))
    except UsageError as error:
        print(f"aim train: error: {error}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from aim.app.train import command_train as run
        elif args.command == "eval":
            from aim.app.evaluate import command_eval as run
        elif args.command == "explain":
            from aim.app.explain import command_explain as run
        elif args.command == "report":
            from aim.app.report import command_report as run
        elif args.command == "bench":
            from aim.app.bench import command_bench as run
        elif args.command == "demo":
            from aim.app.demo import run_demo as run
        elif args.command == "data":
            from aim.app.study import command_data as run
        else:
            from aim.app.profiling import command_profile as run
        run(args)
    except UsageError as error:
        # Bad data or settings: one line naming the file or flag, no traceback.
        print(f"aim {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
