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
from aim.nn.backbones import as_stage_dict, stage_channels_of
from tiny_datasets import make_waterbirds
from tiny_runs import TINY



def test_load_checkpoint_gives_the_trained_model_and_its_metadata(tmp_path):
    make_waterbirds(str(tmp_path / "data"))
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(run), *TINY, "--epochs", "1"]) == 0
    model, info = aim.load_checkpoint(str(run))
    assert isinstance(model, aim.AIM) and not model.training
    saved = torch.load(run / "best.pt", weights_only=True)
    assert all(torch.equal(v, saved["model"][k]) for k, v in model.state_dict().items())
    assert info.path == str(run / "best.pt") and info.epoch == saved["epoch"] == 1
    assert info.class_names == saved["class_names"] and info.group_names == saved["group_names"]
    assert info.config.backbone == "small_convnet" and info.config.topdown_channels == 16
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


class PathwayClassifier(torch.nn.Module):
    """A user's model that contains the pathway: the SmallConvNet's stages, FusedTopDownMask,
    average pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.backbone = aim.SmallConvNet()
        self.fpn = aim.FusedTopDownMask(stage_channels_of(self.backbone), out_channels=8, depth=2, mask_hidden_channels=8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, images):
        features, masks = self.fpn(as_stage_dict(self.backbone(images)), return_masks=True)
        return self.head(features[next(iter(features))].mean((2, 3))), masks


def outputs_as_tensors(output):
    if isinstance(output, aim.AIMOutput):
        return [output.logits, *output.stage_logits.values(), *output.masks.values()]
    logits, masks = output
    return [logits, *masks.values()]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("capture", ["symbolic_trace", "export"])
@pytest.mark.parametrize("make_model", [lambda: aim.AIM("resnet18", num_classes=2), PathwayClassifier],
                         ids=["default AIM resnet18", "module with the pathway"])
def test_fx_symbolic_trace_and_torch_export_give_the_module_outputs(make_model, capture, mode):
    torch.manual_seed(0)
    model = getattr(make_model(), mode)()
    images = torch.rand(2, 3, 64, 64)
    captured = (torch.fx.symbolic_trace(model) if capture == "symbolic_trace"
                else torch.export.export(model, (images,)).module())
    with torch.no_grad():
        torch.manual_seed(1)  # train mode: the same Gumbel draws
        got = outputs_as_tensors(captured(images))
        torch.manual_seed(1)
        expected = outputs_as_tensors(model(images))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)  # the same ops on the same inputs
