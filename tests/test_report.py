"""`aim report` end to end on a tiny run: the page's tables hold the numbers of `aim eval --json`,
the page is self-contained, empty masks are labelled, bad input stops with one line and leaves
no report, and the page opens in headless Chromium without console errors with every image
decoded (skipped, with the reason, only where Chromium or Playwright is missing).

The runs are those of tests/test_train.py: 32x32 images, 32 training images, SmallConvNet."""
import base64
import html.parser
import io
import json
import os
import shutil
import tempfile

import pytest
import torch

from aim.app.cli import main
from aim.app.evaluate import format_number
from tiny_runs import TINY
from tiny_datasets import make_waterbirds, write_metadata

# Small galleries and subsets: the page is the same, it takes seconds.
SMALL = ["--gallery", "2", "--background-images", "2", "--faithfulness-images", "4", "--steps", "4", "--grids", "4",
         "--threads", "1"]
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dataset, an AIM run (2 epochs), a baseline run (1 epoch), the report of the AIM run
    with the baseline beside, and `aim eval --json` of both best.pt."""
    root = tmp_path_factory.mktemp("report")
    data = root / "data"
    rows = make_waterbirds(str(data))
    assert main(["train", "--data", str(data), "--out", str(root / "aim"), "--epochs", "2", *TINY]) == 0
    assert main(["train", "--data", str(data), "--out", str(root / "baseline"), "--model", "baseline", "--epochs", "1", *TINY]) == 0
    report = root / "report.html"
    assert main(["report", str(root / "aim"), "--data", str(data), "--baseline", str(root / "baseline"), "--out", str(report),
                 *SMALL]) == 0
    evals = {}
    for kind in ("aim", "baseline"):
        out = root / f"{kind}.json"
        assert main(["eval", str(root / kind / "best.pt"), "--data", str(data), "--segmentations", str(data / "segmentations"),
                     "--json", str(out), "--workers", "0"]) == 0
        evals[kind] = json.loads(out.read_text())
    return {"root": root, "data": data, "rows": rows, "report": report, "eval": evals}


class _Tables(html.parser.HTMLParser):
    """{table id: [[cell text, ...] per row]} and every <img> src of a page."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.scripts, self._table, self._cell = {}, [], 0, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None:
            self._table[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(path):
    parser = _Tables()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def rows_by_name(table):
    """{first cell without its tags ("conflicting", "worst"): the other cells}."""
    return {row[0].replace("conflicting", "").strip(): [c.replace("worst", "").strip() for c in row[1:]] for row in table if row}


def expected_cells(evals):
    """{table id: {row name: [cell, ...]}} of the numbers `aim eval --json` gave, as the page prints them."""
    aim, baseline = evals["aim"], evals["baseline"]
    groups = ["landbird/land", "landbird/water", "waterbird/land", "waterbird/water"]
    accuracy = {name: [format_number(aim["group_accuracy"][g]), format_number(baseline["group_accuracy"][g])]
                for g, name in enumerate(groups)}
    for label, key in (("accuracy (all images)", "accuracy"), ("mean-group accuracy", "mean_group_accuracy"),
                       ("weighted accuracy (training proportions)", "weighted_accuracy"),
                       ("worst-group accuracy", "worst_group_accuracy")):
        accuracy[label] = [format_number(aim[key]), format_number(baseline[key])]
    shares = ("object", "background", "bias")
    decision = {name: [format_number(e["decision_audit"]["by_group"][s][g]) for e in (aim, baseline) for s in shares]
                for g, name in enumerate(groups)}
    decision["all images"] = [format_number(e["decision_audit"][s]) for e in (aim, baseline) for s in shares]
    leak = {stage: [format_number(aim["mask_active_fraction"][stage]), format_number(v["empty_share"]),
                    format_number(v["auc_class"]), format_number(v["auc_background"])] + [format_number(a) for a in v["active_by_group"]]
            for stage, v in aim["mask_area_leak"].items()}
    pointing = {("GradCAM" if k == "gradcam" else f"mask, stage {k}"):
                [format_number(aim["energy_pointing_game"][k]), format_number(baseline["energy_pointing_game"].get(k))]
                for k in aim["energy_pointing_game"]}
    return {"accuracy": accuracy, "decision": decision, "leak": leak, "pointing-game": pointing}


def test_tables_hold_the_numbers_of_aim_eval(runs):
    page = parse(runs["report"])
    for table, expected in expected_cells(runs["eval"]).items():
        found = rows_by_name(page.tables[table])
        for name, cells in expected.items():
            # The accuracy table has image counts before the models' columns.
            assert found[name][-len(cells):] == cells, (table, name)
    # Worst group first, marked in the models' columns where it is that model's worst.
    aim = runs["eval"]["aim"]
    accuracy_rows = [row for row in page.tables["accuracy"][1:] if "accuracy" not in row[0]]
    assert format_number(aim["worst_group_accuracy"]) in accuracy_rows[0][-2] and "worst" in accuracy_rows[0][-2]
    # Images and training images per group: the test split's and the checkpoint's counts.
    counts = torch.load(runs["root"] / "aim" / "best.pt", weights_only=True)["train_group_counts"]
    test_groups = [2 * r["y"] + r["place"] for r in runs["rows"] if r["split"] == 2]
    for row in accuracy_rows:
        g = ["landbird/land", "landbird/water", "waterbird/land", "waterbird/water"].index(row[0].replace("conflicting", "").strip())
        assert row[1:3] == [str(test_groups.count(g)), str(counts[g])]
    facts = rows_by_name(page.tables["run"])
    assert facts["model"] == ["AIM[2, 0.25]"] and facts["backbone"] == ["small_convnet"]
    assert f"epoch {aim['epoch']} of 2" in facts["checkpoint"][0] and "commit" in facts["package"][0]
    faithfulness = page.tables["faithfulness"]
    assert [row[:2] for row in faithfulness[1:]] == [["AIM", "decision map"], ["AIM", "GradCAM"],
                                                     ["baseline", "decision map"], ["baseline", "GradCAM"]]
    for row in faithfulness[1:]:
        for cell in (row[2], row[4], row[5]):  # grid pointing game, deletion and insertion AUC
            assert cell == "n/a" or 0 <= float(cell) <= 1


def test_page_is_self_contained(runs):
    from PIL import Image

    text = runs["report"].read_text(encoding="utf-8")
    page = parse(runs["report"])
    assert page.scripts == 0 and "http://" not in text and "https://" not in text
    # Curves of both runs, the faithfulness plot, and per gallery image at least image + 2 masks + decision + GradCAM.
    assert len(page.images) >= 3 + 5 * 2
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            image.load()
            assert image.width > 0 and image.height > 0


def test_empty_masks_are_labelled(runs, tmp_path):
    run = tmp_path / "empty"
    # Mask logits start at -30: after one short epoch every eval mask is still empty.
    assert main(["train", "--data", str(runs["data"]), "--out", str(run), "--epochs", "1", "--initial-mask-logit", "-30",
                 "--mask-budget", "loss", *TINY]) == 0  # the default budget never empties an eval mask
    report = tmp_path / "empty.html"
    assert main(["report", str(run), "--out", str(report), *SMALL]) == 0  # --data: the one the run recorded
    page = parse(report)
    leak = rows_by_name(page.tables["leak"][1:])
    assert set(leak) == {"2", "3"} and all(cells[1] == "1.0000" for cells in leak.values())  # empty on every image
    assert "EMPTY" in report.read_text(encoding="utf-8")


def copy_of(folder, tmp_path, name, without=None):
    target = tmp_path / name
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns(without) if without else None)
    return target


@pytest.mark.parametrize("case", ["no checkpoint", "other classes", "no segmentations"])
def test_bad_input_prints_one_line_naming_the_file_and_writes_no_report(runs, tmp_path, capsys, case):
    run, data = runs["root"] / "aim", runs["data"]
    if case == "no checkpoint":
        run, named = copy_of(run, tmp_path, "run", without="best.pt"), "best.pt"
    elif case == "other classes":
        data = copy_of(data, tmp_path, "data")
        write_metadata(str(data), [{**r, "class_name": ("cat", "dog")[r["y"]], "place_name": ("in", "out")[r["place"]]}
                                   for r in runs["rows"]])
        named = str(data)
    else:
        data, named = copy_of(data, tmp_path, "data", without="segmentations"), "segmentations"
    out = tmp_path / "report.html"
    out.write_text("the previous report")
    capsys.readouterr()
    assert main(["report", str(run), "--data", str(data), "--out", str(out), *SMALL]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("aim report: error: ") and named in error, error
    if case == "other classes":
        assert "cat" in error and str(runs["root"] / "aim" / "best.pt") in error
    assert out.read_text() == "the previous report"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["report.html"]  # no temporary file left


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the Python package playwright is not installed (requirements-test.txt)")
    if not os.path.isfile(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium; .ci/run does)")
    return sync_playwright


def test_page_in_headless_chromium(runs, tmp_path):
    sync_playwright = _browser_or_skip()
    expected = expected_cells(runs["eval"])
    problems = []
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, viewport={"width": 1280, "height": 900},
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("request", lambda request: None if request.url.startswith(("file:", "data:"))
                    else problems.append(f"network request {request.url}"))
            page.goto(runs["report"].as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, "
                                   "i.getBoundingClientRect().width])")
            tables = {name: page.inner_text(f"table#{name}") for name in expected}
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert len(images) >= 13 and all(done and width > 0 and height > 0 and shown > 0 for done, width, height, shown in images), images
    for name, rows in expected.items():
        for row, cells in rows.items():
            assert row in tables[name] and all(cell in tables[name] for cell in cells), (name, row)
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
