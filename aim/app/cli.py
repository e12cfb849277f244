"""The `aim` command: train, evaluate and explain AIM on a dataset, run the demo and the kernel
benchmarks. Argument parsing and dispatch only; the work is in aim.app.train, aim.app.evaluate,
aim.app.explain, aim.app.report, aim.app.bench, aim.app.demo and aim.app.profiling."""
import argparse
import json
import sys

from aim.nn.backbones import BACKBONE_NAMES
from aim.data.transforms import PREPROCESSINGS
from aim.nn.topdown import MASK_BUDGETS
from aim.config import SMALL_BACKBONE


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


def build_parser():
    parser = argparse.ArgumentParser(prog="aim", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train AIM or the baseline on a WaterBirds-layout or class-per-folder dataset",
                                formatter_class=DefaultsHelpFormatter,
                                description="Train on DIR (metadata.csv: WaterBirds layout; else DIR/train/<class>/, "
                                            "DIR/val/<class>/). Multi-process: torchrun --no-python --nproc-per-node K aim train ...")
    train.add_argument("--data", required=True, metavar="DIR", help="the dataset folder")
    train.add_argument("--out", required=True, metavar="RUN", help="run folder: config.json, log.jsonl, last.pt, best.pt, curves.png")
    train.add_argument("--segmentations", metavar="DIR", help="foreground masks: val pointing game per epoch")
    train.add_argument("--model", choices=("aim", "baseline"), default="aim",
                       help="AIM, or the backbone with a linear classifier on its last stage")
    train.add_argument("--backbone", default="resnet50", metavar="NAME",
                       help=f"{', '.join(BACKBONE_NAMES + (SMALL_BACKBONE,))}, or timm:NAME for any timm model with stage "
                            f"maps (small_convnet: for toy data), e.g. timm:convnext_atto, timm:swin_tiny_patch4_window7_224, timm:vit_tiny_patch16_224 "
                            f"(pip install .[timm])")
    train.add_argument("--timm-kwargs", type=json_object, default=None, metavar="JSON",
                       help='timm.create_model arguments of a timm:NAME backbone, e.g. \'{"drop_path_rate": 0.1}\' '
                            "(img_size follows --image-size for models bound to one input size)")
    train.add_argument("--weights", default="none", metavar="none|DEFAULT|PATH",
                       help="backbone weights: none, torchvision's or timm's pretrained (DEFAULT, needs network), or a "
                            "torchvision or timm state dict / `aim train` checkpoint file")
    train.add_argument("--depth", type=int, default=2, help="top-down stages (AIM[depth, target])")
    train.add_argument("--target", type=float, default=0.25, help="mask-annealing target (fraction of active entries)")
    train.add_argument("--topdown-channels", type=int, default=256, help="width of the top-down pathway")
    train.add_argument("--mask-channels", type=int, default=128, help="width of each mask estimator")
    train.add_argument("--temperature", type=float, default=1.0, help="Gumbel temperature")
    train.add_argument("--initial-mask-logit", type=float, default=2.0, help="initial bias of the mask estimators' logits")
    train.add_argument("--stage-loss-weight", type=float, default=1.0, help="weight of the stage classifiers' cross-entropies")
    train.add_argument("--warmup-epochs", type=int, default=0, help="epochs with masks fully on (tau 1) before annealing")
    train.add_argument("--select-annealed", action="store_true", help="AIM: select best.pt only among epochs at the target tau")
    train.add_argument("--noise-off-epochs", type=int, default=0, help="AIM: the last N epochs train without Gumbel noise")
    train.add_argument("--backbone-frozen-epochs", type=int, default=0,
                       help="the first N epochs train all but the backbone's weights (its BatchNorm statistics still adapt), "
                            "then the whole network: linear probing, then fine-tuning")
    train.add_argument("--mask-topdown-context", action=argparse.BooleanOptionalAction, default=True,
                       help="AIM: finer mask estimators also read the upsampled coarser fused map (default on; "
                            "docs/masks_and_audit.md)")
    train.add_argument("--mask-saliency-prior", action="store_true",
                       help="AIM: mask logits also get a learned multiple of each stage map's standardized log energy, "
                            "so the weakest positions drop first as tau anneals")
    train.add_argument("--per-image-mask-loss", action=argparse.BooleanOptionalAction, default=True,
                       help="AIM: mask loss on each image's active fraction (default); --no-per-image-mask-loss: "
                            "on the batch's, the paper's term, whose masks can encode the class in their area")
    train.add_argument("--pooling", choices=("all", "active"), default="all",
                       help="AIM: classifiers average the masked map over all positions or over the active ones only")
    train.add_argument("--mask-budget", choices=MASK_BUDGETS, default="eval",
                       help="AIM: 'loss' (the paper's): the mask loss pulls each mask's area towards tau; 'eval' (default): so in "
                            "training, and at eval every image keeps exactly tau of each stage's positions (its highest logits), "
                            "so the area carries nothing; 'fixed': exactly tau in training too")
    train.add_argument("--epochs", type=int, default=30, help="training epochs")
    train.add_argument("--anneal-epochs", type=int, default=10, help="epochs over which tau goes from 1.0 to --target")
    train.add_argument("--batch-size", type=int, default=32, help="global batch (split over processes)")
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine decay over the run)")
    train.add_argument("--backbone-lr", type=float, default=None, help="learning rate of the backbone (default: --lr)")
    train.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    train.add_argument("--image-size", type=int, default=224, help="side of the square images the model sees")
    train.add_argument("--preprocessing", choices=PREPROCESSINGS, default="imagenet",
                       help="imagenet: random resized crop + flip in training, resize + center crop in evaluation, "
                            "ImageNet normalization (group_DRO's); raw: images as they are (--image-size square, values "
                            "in [0, 1]), as `aim demo` trains on the embedded benchmark (`aim data embedded` writes it)")
    train.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    train.add_argument("--seed", type=int, default=0, help="seeds the initialization, data order, augmentation and noise")
    train.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: each process its LOCAL_RANK GPU)")
    train.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype (fp16: CUDA only)")
    train.add_argument("--channels-last", action="store_true", help="channels_last memory format (faster convolutions on GPUs)")
    train.add_argument("--compile", action="store_true", help="torch.compile the whole model")
    train.add_argument("--compile-backend", default="inductor",
                       help="torch.compile backend (aot_eager: graph capture and AOTAutograd without code generation)")
    train.add_argument("--freeze-bn", action="store_true", help="keep BatchNorm statistics fixed (eval mode) while training")
    train.add_argument("--threads", type=int, default=0, help="torch intra-op CPU threads (0: as many as torch picks)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")

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

    demo = commands.add_parser("demo", help="AIM vs the baseline under a spurious correlation on the embedded benchmark "
                                             "(pretraining, fine-tuning, test table, PNG of masks and GradCAM)")
    demo.add_argument("--out", default="aim_demo_out", help="output directory (summary.json, the PNG, the two runs)")
    demo.add_argument("--spurious-correlation", type=float, default=0.95, help="P(background == class) in training")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=12, help="fine-tuning epochs")
    demo.add_argument("--anneal-epochs", type=int, default=6, help="epochs over which tau goes from 1.0 to --target")
    demo.add_argument("--target", type=float, default=0.25, help="mask-annealing target (fraction of active entries)")
    demo.add_argument("--depth", type=int, default=2, help="top-down stages (AIM[depth, target])")
    demo.add_argument("--lr", type=float, default=5e-4, help="fine-tuning rate of the new layers")
    demo.add_argument("--backbone-lr", type=float, default=None,
                      help="fine-tuning rate of the pretrained backbone (default: --lr, the whole network fine-tuned)")
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--train-size", type=int, default=2000)
    demo.add_argument("--val-size", type=int, default=400, help="balanced: a multiple of 4")
    demo.add_argument("--test-size", type=int, default=800, help="balanced: a multiple of 4")
    demo.add_argument("--unseen-size", type=int, default=800, help="the unseen-scene test; balanced: a multiple of 4")
    demo.add_argument("--pretrain-size", type=int, default=8000, help="images of the unbiased pretraining set")
    demo.add_argument("--pretrain-epochs", type=int, default=12)
    demo.add_argument("--image-size", type=int, default=64)
    demo.add_argument("--reference", action="store_true", help="use the plain-PyTorch reference ops instead of the fused ones")
    # One thread by default: this model's ops are small, so on a 2-core machine shared with other
    # work a second intra-op thread mostly waits at barriers (measured 7x slower steps under load).
    demo.add_argument("--threads", type=int, default=1, help="torch intra-op CPU threads (0: torch's default)")

    data = commands.add_parser("data", help="write a generated dataset to disk")
    data_kinds = data.add_subparsers(dest="kind", required=True)
    embedded = data_kinds.add_parser("embedded", help="the demo's task in the WaterBirds layout (metadata.csv, segmentations/, "
                                                       "unseen_scenes/), the same images `aim demo` trains and tests on")
    embedded.add_argument("--out", required=True, metavar="DIR", help="folder to write (replaced if it holds a metadata.csv)")
    embedded.add_argument("--spurious-correlation", type=float, default=0.95, help="P(background == class) in training")
    embedded.add_argument("--seed", type=int, default=0)
    embedded.add_argument("--image-size", type=int, default=64)
    embedded.add_argument("--train-size", type=int, default=2000)
    embedded.add_argument("--val-size", type=int, default=400, help="balanced: a multiple of 4")
    embedded.add_argument("--test-size", type=int, default=800, help="balanced: a multiple of 4")
    embedded.add_argument("--unseen-size", type=int, default=800, help="the unseen-scene test; balanced: a multiple of 4")

    profile = commands.add_parser("profile", help="parameters and FLOPs AIM adds to a torchvision or timm backbone")
    profile.add_argument("--backbone", default="convnext_tiny", metavar="NAME", help="a torchvision name or timm:NAME")
    profile.add_argument("--depth", type=int, default=2)
    profile.add_argument("--image-size", type=int, default=224)
    profile.add_argument("--num-classes", type=int, default=2)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from aim.errors import UsageError

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
