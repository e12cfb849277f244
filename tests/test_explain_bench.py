"""`aim explain` (a PNG per image with masks, GradCAM and the prediction) and `aim bench`
(discovers benchmarks/bench_*.py, runs each, collects its result files, plots speedups)."""
import json
import textwrap

import pytest
import torch

from aim.app.cli import main
from aim.app.explain import explain_image
from aim.checkpoint import read_checkpoint, model_from_checkpoint
from tiny_runs import TINY
from tiny_datasets import make_waterbirds

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("waterbirds")
    rows = make_waterbirds(str(root))
    runs = {}
    for kind in ("aim", "baseline"):
        runs[kind] = tmp_path_factory.mktemp(kind)
        assert main(["train", "--data", str(root), "--out", str(runs[kind]), "--model", kind, "--epochs", "1", *TINY]) == 0
    return root, rows, runs


@pytest.mark.parametrize("kind", ["aim", "baseline"])
def test_explain_writes_one_png_per_image(trained, tmp_path, capsys, kind):
    root, rows, runs = trained
    images = [str(root / rows[i]["img_filename"]) for i in (0, 1)]
    images.append(images[0])  # the same name twice gets two files
    assert main(["explain", str(runs[kind] / "best.pt"), *images, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["train_00000.png", "train_00001.png", "train_00000_2.png"])
    assert all((tmp_path / n).read_bytes()[:8] == PNG for n in names)
    assert printed.count(" -> ") == 3 and ("landbird" in printed or "waterbird" in printed)


def test_explanation_maps_match_the_model(trained):
    root, rows, runs = trained
    checkpoint = read_checkpoint(str(runs["aim"] / "best.pt"))
    model = model_from_checkpoint(checkpoint)
    image = torch.randn(3, 32, 32)
    explanation = explain_image(model, image, checkpoint["class_names"])
    with torch.no_grad():
        out = model(image.unsqueeze(0))
    probability = out.logits.softmax(1).max().item()
    assert explanation["probability"] == pytest.approx(probability)
    assert set(explanation["masks"]) == set(out.masks)
    for name, mask in explanation["masks"].items():  # nearest upsampling keeps the active fraction
        assert mask.shape == (32, 32) and mask.mean().item() == pytest.approx(out.masks[name].float().mean().item())
    cam = explanation["gradcam"]
    assert cam.shape == (32, 32) and cam.min() >= 0 and cam.max() <= 1
    # The decision map is the exact audit: it sums with the bias to the logit margin over the
    # runner-up (float32 sums of ~1000 terms: a few ulps of the margin), and it is 0 outside
    # every mask.
    top2 = out.logits[0].topk(2)
    assert explanation["runner_up"] == checkpoint["class_names"][int(top2.indices[1])]
    assert explanation["margin"] == pytest.approx((top2.values[0] - top2.values[1]).item(), abs=1e-5)
    decision = explanation["decision"]
    assert decision.shape == (32, 32)
    assert decision.sum().item() + explanation["bias"] == pytest.approx(explanation["margin"], abs=1e-5)
    outside = torch.stack(list(explanation["masks"].values())).amax(0) == 0
    assert torch.all(decision[outside] == 0)


def test_explain_unreadable_image_writes_nothing(trained, tmp_path, capsys):
    _, _, runs = trained
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"no")
    assert main(["explain", str(runs["aim"] / "best.pt"), str(bad), "--out", str(tmp_path / "out")]) == 2
    assert f"{bad}: cannot be read as an image" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_bench_runs_every_script_and_plots_speedups(tmp_path, capsys):
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    for name, speedup in (("a", 2.0), ("b", 0.5)):
        (folder / f"bench_{name}.py").write_text(textwrap.dedent(f"""
            import json, os, sys
            quick = "--quick" in sys.argv
            os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
            rows = [{{"shape": "8x8", "mode": "forward", "provider": p, "median_ms": 1.0, "x_vs_eager": x}}
                    for p, x in (("eager", 1.0), ("aim_kernels", {speedup}))]
            stem = os.path.join(os.path.dirname(__file__), "results", "{name}" + ("_quick" if quick else ""))
            json.dump({{"rows": rows}}, open(stem + ".json", "w"))
            open(stem + ".csv", "w").write("shape\\n8x8\\n")
        """))
    (folder / "common.py").write_text("raise SystemExit('not a benchmark')\n")
    out = tmp_path / "out"
    assert main(["bench", "--quick", "--benchmarks", str(folder), "--out", str(out)]) == 0
    runs = json.loads((out / "runs.json").read_text())
    assert [r["script"] for r in runs["runs"]] == ["bench_a.py", "bench_b.py"] and runs["quick"]
    assert sorted(p.name for p in out.iterdir()) == ["a_quick.csv", "a_quick.json", "b_quick.csv", "b_quick.json",
                                                     "runs.json", "speedups.png"]
    assert (out / "speedups.png").read_bytes()[:8] == PNG


def test_bench_outside_a_checkout_says_where_to_run(tmp_path, capsys):
    assert main(["bench", "--benchmarks", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no bench_*.py in" in err and "repository root" in err
