"""``aim demo``: the spurious-correlation protocol on the embedded benchmark, for one
seed (:mod:`aim.app.study`, through the training loop and evaluation of ``aim train`` / ``aim eval``):
pretrain a small backbone on an unbiased generated set (cached), fine-tune the baseline and AIM
from it on the biased task, select each on val worst-group accuracy, and compare them on the
balanced test split."""
import json
import os
import time

import torch
import torch.nn.functional as F


def run_demo(args):
    import aim_kernels
    from aim.app import study
    from aim.data.embedded import AREA_RANGE, FINETUNE_CLASSES, PRETRAIN_SHAPES, SCENES, TEXTURES, UNSEEN_SCENES
    import aim

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    pretrain = study.PretrainSettings(image_size=args.image_size, train_size=args.pretrain_size, epochs=args.pretrain_epochs)
    task = study.TaskSettings(image_size=args.image_size, spurious_correlation=args.spurious_correlation,
                              train_size=args.train_size, val_size=args.val_size, test_size=args.test_size,
                              unseen_size=args.unseen_size, seed=args.seed)
    classes = "; ".join(f"{name} = {' / '.join(shapes)}" for name, shapes in FINETUNE_CLASSES.items())
    scenes = "; ".join(f"{name} = {' / '.join(families)}" for name, families in SCENES.items())
    print(f"embedded benchmark ({args.image_size}x{args.image_size}): pretraining on {pretrain.train_size} images of "
          f"{len(PRETRAIN_SHAPES)} shapes on {len(TEXTURES)} texture families, class and background independent; "
          f"fine-tuning classes of sub-shapes pretraining never showed ({classes}) on scene families ({scenes}), "
          f"background = class in {args.spurious_correlation:.0%} of {task.train_size} training images, val "
          f"({task.val_size}) and test ({task.test_size}) balanced over the 4 groups, unseen-scene test ({task.unseen_size}) "
          f"on {' / '.join(UNSEEN_SCENES)}; object area {AREA_RANGE[0]:.0%}-{AREA_RANGE[1]:.0%} of the image and "
          f"colour random, independent of the class")
    print(f"ops: {'reference (plain PyTorch)' if args.reference else 'fused'}; aim_kernels backends: "
          + ", ".join(k for k, v in aim_kernels.backends().items() if v["available"]))
    weights, trained, pretrain_accuracy = study.pretrained_backbone(pretrain, threads=args.threads)
    print(f"pretrained backbone ({'trained now' if trained else 'from the cache'}): {weights}, "
          f"val accuracy {pretrain_accuracy:.3f} over {len(PRETRAIN_SHAPES)} shapes")
    train, val, test, unseen = study.task_splits(task)
    overrides = {"epochs": args.epochs, "anneal_epochs": args.anneal_epochs, "target": args.target, "depth": args.depth,
                 "lr": args.lr, "backbone_lr": args.backbone_lr, "batch_size": args.batch_size,
                 "use_reference": args.reference}
    pathway, trained, pathway_accuracy = study.pretrained_pathway(pretrain, weights, study.PathwaySettings(epochs=args.pathway_epochs),
                                                                  overrides, threads=args.threads)
    if pathway is not None:
        print(f"pretrained AIM pathway ({'trained now' if trained else 'from the cache'}): {pathway}, "
              f"val accuracy {pathway_accuracy:.3f}")
    records, models = {}, {}
    for kind in ("baseline", "aim"):
        run = os.path.join(args.out, kind)
        print(f"fine-tuning {kind} in {run}")
        records[kind] = study.finetune(kind, weights, train, val, test, run, seed=args.seed, threads=args.threads,
                                       overrides=overrides, unseen=unseen, pathway_weights=pathway)
        models[kind], _ = aim.load_checkpoint(run)
    rows = {kind: study.summary_row(record) for kind, record in records.items()}
    uniform = test.foregrounds.flatten(1).float().mean(1).mean().item()
    print(side_by_side(rows, uniform))
    placement = records["aim"]["test"]["mask_placement"]
    print("AIM masks on conflicting test images (background contradicts the class): fraction kept of the object / "
          "of the background: " + ", ".join(f"stage {k} {v['conflict']['object_kept']:.2f} / {v['conflict']['background_kept']:.2f}"
                                           for k, v in placement.items()))
    png = os.path.join(args.out, "test_images.png")
    save_comparison_grid(models, test, png)
    summary = {"args": vars(args), "pretrained_backbone": weights, "pretrain_val_accuracy": pretrain_accuracy,
               "pretrained_pathway": pathway, "pathway_val_accuracy": pathway_accuracy,
               "uniform_map_energy_pointing_game": uniform, "table": rows, "records": records,
               "time_s": time.perf_counter() - start}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {png} (rows: two test images of each group, those whose background contradicts the class first; "
          f"columns: image, AIM's masks finest first, AIM's GradCAM, the baseline's GradCAM) and "
          f"{os.path.join(args.out, 'summary.json')}")
    report_started = time.perf_counter()
    report_path = write_demo_report(args, test)
    print(f"wrote {report_path} (AIM's audit beside the baseline, {time.perf_counter() - report_started:.0f} s): "
          f"open it in a browser")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return summary


# The demo's report: small galleries and a subset for deletion/insertion, so it adds seconds, not minutes.
DEMO_REPORT = dict(gallery_per_group=3, background_images=4, faithfulness_per_group=16, steps=12, grids=16, batch_size=100)


def write_demo_report(args, test):
    """report.html of the AIM run with the baseline beside, on the test split."""
    from aim.app import report

    runs = {kind: report.load_run(os.path.join(args.out, kind)) for kind in ("aim", "baseline")}
    label = (f"embedded benchmark (generated in memory, seed {args.seed}, background = class in "
             f"{args.spurious_correlation:.0%} of training images)")
    path = os.path.join(args.out, "report.html")
    return report.write_report(path, runs["aim"], test.as_dataset(), label, "test", baseline=runs["baseline"],
                               settings=report.ReportSettings(**DEMO_REPORT))


def side_by_side(rows, uniform):
    """The demo's table: baseline vs AIM on the test split."""
    def cell(value):
        return "-" if value is None else f"{value:.3f}"

    stages = list(rows["aim"]["epg_masks"])
    lines = [f"{'test (val-selected epoch)':<34} {'baseline':>9} {'AIM':>9}",
             f"{'average accuracy (train-weighted)':<34} {cell(rows['baseline']['weighted_accuracy']):>9} "
             f"{cell(rows['aim']['weighted_accuracy']):>9}",
             f"{'mean-group accuracy':<34} {cell(rows['baseline']['accuracy']):>9} {cell(rows['aim']['accuracy']):>9}",
             f"{'worst-group accuracy':<34} {cell(rows['baseline']['worst_group']):>9} {cell(rows['aim']['worst_group']):>9}",
             f"{'unseen scenes: accuracy':<34} {cell(rows['baseline']['unseen_accuracy']):>9} {cell(rows['aim']['unseen_accuracy']):>9}",
             f"{'EPG of GradCAM':<34} {cell(rows['baseline']['epg_gradcam']):>9} {cell(rows['aim']['epg_gradcam']):>9}"]
    lines += [f"{'EPG of mask, stage ' + s:<34} {'-':>9} {cell(rows['aim']['epg_masks'][s]):>9}" for s in stages]
    for share in ("object", "background", "bias"):  # aim.analysis.audit.decision_shares, mean over test images
        lines.append(f"{'decision on the ' + share:<34} {cell(rows['baseline']['decision_' + share]):>9} "
                     f"{cell(rows['aim']['decision_' + share]):>9}")
    for s, leak in rows["aim"]["mask_leak"].items():  # aim.analysis.audit.mask_area_leak
        lines.append(f"{'mask ' + s + ': empty on':<34} {'-':>9} {cell(leak['empty_share']):>9}")
        lines.append(f"{'mask ' + s + ': area AUC class / bg':<34} {'-':>9} {cell(leak['auc_class']) + ' / ' + cell(leak['auc_background']):>9}")
    lines.append(f"{'selected epoch':<34} {rows['baseline']['best_epoch']:>9} {rows['aim']['best_epoch']:>9}")
    lines.append(f"(EPG of a map that keeps everything = object area / image area = {uniform:.3f}; decision shares: "
                 "of |object| + |background| + |bias| in the margin over the runner-up; area AUC: how well a mask's "
                 "active fraction alone tells the class / the background, 0.5 = not at all)")
    return "\n".join(lines)


def save_comparison_grid(models, split, path, per_group=2):
    """PNG: ``per_group`` test images of every (class, background) group, the groups whose
    background contradicts the class first; per image the image, AIM's masks (dropped positions
    dimmed, an empty mask titled so), AIM's GradCAM and the baseline's GradCAM (on the true
    class), the object outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aim.analysis.attribution import gradcam

    groups = sorted(range(4), key=lambda g: (g // 2 == g % 2, g))  # conflicting groups first
    shown = torch.cat([torch.nonzero(split.groups == g).flatten()[:per_group] for g in groups])
    images, labels = split.images[shown], split.labels[shown]
    size = images.shape[-2:]
    with torch.no_grad():
        aim_out = models["aim"].eval()(images)
        baseline_pred = models["baseline"].eval()(images).argmax(1)
    masks = {name: F.interpolate(m.float(), size=size, mode="nearest")[:, 0] for name, m in aim_out.masks.items()}
    cams = {}
    for kind in ("aim", "baseline"):
        cam = F.interpolate(gradcam(models[kind], images, labels), size=size, mode="bilinear", align_corners=False)[:, 0]
        cams[kind] = cam / cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    columns = 1 + len(masks) + 2
    fig, axes = plt.subplots(len(shown), columns, figsize=(1.6 * columns, 1.6 * len(shown) + 0.4), squeeze=False)
    for i in range(len(shown)):
        picture = images[i].permute(1, 2, 0).numpy()
        outline = split.foregrounds[shown[i], 0].numpy()
        panels = [("image\n" + split.class_names[labels[i]] + " on " + split.background_names[split.backgrounds[shown[i]]], picture, None)]
        panels += [(f"AIM mask {name}" + (" EMPTY" if not m[i].any() else ""), picture * (0.15 + 0.85 * m[i].numpy()[..., None]), None)
                   for name, m in masks.items()]
        panels += [(f"AIM GradCAM\npred {split.class_names[aim_out.logits[i].argmax()]}", picture, cams["aim"][i].numpy()),
                   (f"baseline GradCAM\npred {split.class_names[baseline_pred[i]]}", picture, cams["baseline"][i].numpy())]
        for ax, (title, shown_picture, heat) in zip(axes[i], panels):
            ax.imshow(shown_picture)
            if heat is not None:
                ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.contour(outline, levels=[0.5], colors="red", linewidths=0.6)
            ax.axis("off")
            if i == 0 or heat is not None or title.startswith("image") or title.endswith("EMPTY"):
                ax.set_title(title, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
