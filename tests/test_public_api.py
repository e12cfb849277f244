"""The public entry points a newcomer reaches for first: the README's Python example,
``aim.load_checkpoint`` of a trained run and torchvision's ``create_feature_extractor`` over ``aim.AIM``."""
import os
import re

import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor

import aim
from aim.app.cli import main
from aim.errors import UsageError
from tiny_datasets import make_waterbirds

TINY = ["--backbone", "small_convnet", "--topdown-channels", "8", "--mask-channels", "8", "--image-size", "32",
        "--batch-size", "8", "--workers", "0", "--threads", "1", "--anneal-epochs", "1", "--epochs", "1"]


def test_load_checkpoint_gives_the_trained_model_and_its_metadata(tmp_path):
    make_waterbirds(str(tmp_path / "data"))
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(run), *TINY]) == 0
    model, info = aim.load_checkpoint(str(run))
    assert isinstance(model, aim.AIM) and not model.training
    saved = torch.load(run / "best.pt", weights_only=True)
    assert all(torch.equal(v, saved["model"][k]) for k, v in model.state_dict().items())
    assert info.path == str(run / "best.pt") and info.epoch == saved["epoch"] == 1
    assert info.class_names == saved["class_names"] and info.group_names == saved["group_names"]
    assert info.config.backbone == "small_convnet" and info.config.topdown_channels == 8
    assert info.train_group_counts == saved["train_group_counts"] and info.val == saved["val"]
    from_file, _ = aim.load_checkpoint(str(run / "last.pt"))
    assert all(torch.equal(v, saved["model"][k]) for k, v in from_file.state_dict().items())  # one epoch: last is best
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert '"aim_demo_out/aim"' in example
    exec(example.replace('"aim_demo_out/aim"', repr(str(run))), {})  # the README's Python example runs as written
    with pytest.raises(UsageError, match="no such file"):
        aim.load_checkpoint(str(tmp_path / "nothing.pt"))
    with pytest.raises(UsageError, match="not a checkpoint"):
        torch.save({"x": 1}, tmp_path / "other.pt")
        aim.load_checkpoint(str(tmp_path / "other.pt"))


@pytest.mark.parametrize("sparse_eval", [True, False])
@pytest.mark.parametrize("budget", ["loss", "eval"])
@pytest.mark.filterwarnings("ignore:The nodes obtained by tracing")  # AIM's train and eval graphs differ by design
def test_create_feature_extractor_traces_aim_in_both_modes(sparse_eval, budget):
    torch.manual_seed(0)
    model = aim.AIM(aim.SmallConvNet(), num_classes=2, out_channels=8, mask_hidden_channels=8,
                    sparse_eval=sparse_eval, mask_budget=budget)
    extractor = create_feature_extractor(model, {"classifier": "logits"})
    images = torch.rand(2, 3, 32, 32)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(extractor, mode)()
        with torch.no_grad():
            torch.manual_seed(1)
            traced = extractor(images)
            torch.manual_seed(1)
            eager = model(images)
        torch.testing.assert_close(traced["logits"], eager.logits)  # train mode: the same Gumbel draws
