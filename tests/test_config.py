"""The settings of a run: one source for every default (TrainConfig, from which `aim train`'s
parser is generated, and the study's recipe, from which `aim demo` takes its defaults), and
``aim train --config FILE`` (JSON or YAML, a run's config.json included) under the flags."""
import dataclasses
import json
import re

import pytest
import torch

from aim.app import study
from aim.app.cli import build_parser, main
from aim.config import METHOD, STUDY, TrainConfig, read_config_file
from aim.errors import UsageError
from tiny_runs import TINY, read_log


def subparser(parser, name):
    return next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[name]


def test_train_flags_are_the_config_fields_with_their_defaults():
    train = build_parser().parse_args(["train", "--data", "d", "--out", "o"])
    for field in dataclasses.fields(TrainConfig):
        if field.name not in ("data", "out"):
            assert getattr(train, field.name) == field.default, field.name
    help_text = subparser(build_parser(), "train").format_help()
    groups = help_text[help_text.index("options:"):]  # the method's and the study's knobs shown apart, after the run's
    assert groups.index("--epochs") < groups.index(METHOD) < groups.index("--mask-budget") < groups.index(STUDY)


def test_demo_and_data_take_the_study_defaults():
    demo = build_parser().parse_args(["demo"])
    for name in ("epochs", "anneal_epochs", "target", "depth", "lr", "backbone_lr", "batch_size"):
        assert getattr(demo, name) == study.FINETUNE_DEFAULTS[name], name
    task = study.TaskSettings()
    data = build_parser().parse_args(["data", "embedded", "--out", "x"])
    for args in (demo, data):
        for name in ("spurious_correlation", "seed", "image_size", "train_size", "val_size", "test_size", "unseen_size"):
            assert getattr(args, name) == getattr(task, name), name
    assert demo.pretrain_size == study.PretrainSettings().train_size and demo.pretrain_epochs == study.PretrainSettings().epochs
    assert demo.pathway_epochs == study.PathwaySettings().epochs


@pytest.mark.parametrize("suffix", ["json", "yaml"])
def test_a_config_file_gives_the_run_and_flags_override_it(waterbirds, tmp_path, suffix):
    settings = {"data": str(waterbirds), "out": str(tmp_path / "from_file"), "backbone": "small_convnet",
                "topdown_channels": 16, "mask_channels": 8, "image_size": 32, "batch_size": 8, "workers": 0,
                "threads": 1, "anneal_epochs": 1, "epochs": 1, "lr": 0.002, "mask_budget": "loss"}
    path = tmp_path / f"run.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(settings))
    else:
        path.write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))
    assert read_config_file(str(path)) == settings
    assert main(["train", "--config", str(path), "--lr", "0.003"]) == 0  # no --data/--out: the file has them
    written = json.loads((tmp_path / "from_file" / "config.json").read_text())
    assert written["lr"] == 0.003 and written["mask_budget"] == "loss" and written["topdown_channels"] == 16
    # A run's config.json reproduces the run: same settings, same weights after the epoch.
    again = tmp_path / "again"
    assert main(["train", "--config", str(tmp_path / "from_file" / "config.json"), "--out", str(again)]) == 0
    first, second = (torch.load(run / "last.pt", weights_only=True)["model"] for run in (tmp_path / "from_file", again))
    assert all(torch.equal(v, second[k]) for k, v in first.items())
    assert read_log(tmp_path / "from_file")[-1]["loss"] == read_log(again)[-1]["loss"]
    assert {**json.loads((again / "config.json").read_text()), "out": None} == {**written, "out": None}


def test_bad_config_files_are_one_line_errors(tmp_path, capsys):
    cases = [("missing.json", None, "no such file"),
             ("broken.json", "{", "not valid JSON"),
             ("broken.yaml", "a: [", "not valid YAML"),
             ("list.json", "[1, 2]", "must hold a mapping"),
             ("typo.json", '{"epoch": 3}', "unknown setting 'epoch' (did you mean 'epochs'?)"),
             ("type.json", '{"epochs": "many"}', "epochs must be an integer, got 'many'"),
             ("bool.json", '{"epochs": true}', "epochs must be an integer"),
             ("removed.json", '{"noise_off_epochs": 2}', "noise_off_epochs 2: this version no longer has"),
             ]
    for name, content, message in cases:
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        with pytest.raises(UsageError, match=re.escape(message)):
            read_config_file(str(path))
        assert main(["train", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--config {path}" in err and message in err, err
    off = tmp_path / "off.json"
    off.write_text('{"noise_off_epochs": 0, "warmup_epochs": 0, "version": "0.1.0", "git_commit": null, "epochs": 2}')
    assert read_config_file(str(off)) == {"epochs": 2}  # an older run's config.json: what is off or metadata is skipped


def test_without_data_from_flags_or_file_train_asks_for_it(tmp_path, capsys):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"out": str(tmp_path / "run"), "epochs": 1}))
    with pytest.raises(SystemExit):
        main(["train", "--config", str(path), *TINY])
    assert "--data" in capsys.readouterr().err
