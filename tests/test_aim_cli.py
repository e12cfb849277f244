"""aim.data, aim.analysis.metrics and the `aim` command line."""
import subprocess
import sys

import pytest
import torch

from aim.analysis import metrics
from aim.app.cli import main
from aim.data import make_toy_split

pytestmark = pytest.mark.usefixtures("single_thread")

def test_toy_split_is_deterministic_and_the_shortcut_has_the_requested_strength():
    a, b = make_toy_split(400, image_size=48, spurious_correlation=0.9, seed=3), make_toy_split(400, image_size=48, spurious_correlation=0.9, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (400, 3, 48, 48) and 0 <= a.images.min() and a.images.max() <= 1
    agreement = (a.labels == a.backgrounds).float().mean().item()
    assert 0.85 < agreement < 0.95
    assert (a.boxes[:, :2] >= 0).all() and (a.boxes[:, 2:] <= 48).all() and (a.boxes[:, 2:] > a.boxes[:, :2]).all()
    assert set(a.groups.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="spurious_correlation"):
        make_toy_split(4, spurious_correlation=1.5)


def test_energy_pointing_game_and_active_fraction():
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, 0, 0] = 1  # top-left cell: pixels 0..7 of a 32x32 image
    mask[0, 0, 3, 3] = 1
    boxes = torch.tensor([[0, 0, 8, 8], [0, 0, 8, 8]])
    foreground = metrics.boxes_to_foreground(boxes, (32, 32))
    assert foreground.shape == (2, 32, 32) and foreground[0, :8, :8].all() and foreground.sum() == 2 * 64
    epg = metrics.energy_pointing_game(mask, foreground)
    torch.testing.assert_close(epg, torch.tensor([0.5, 0.0]))  # second image: empty mask scores 0
    # Negative attribution is no energy; bilinear upsampling spreads a cell over its neighbours.
    signed = torch.tensor([[[[1.0, -5.0], [0.0, 0.0]]]])
    torch.testing.assert_close(metrics.energy_pointing_game(signed, foreground[:1, :16, :16]), torch.tensor([1.0]))
    assert metrics.energy_pointing_game(signed, foreground[:1, :16, :16], mode="bilinear").item() < 1.0
    torch.testing.assert_close(metrics.mask_active_fraction(mask), torch.tensor([2 / 16, 0.0]))
    torch.testing.assert_close(metrics.box_area_fraction(boxes, (32, 32)), torch.tensor([1 / 16, 1 / 16]))


def test_group_accuracies():
    predictions, labels = torch.tensor([0, 1, 1, 0, 1]), torch.tensor([0, 1, 0, 0, 1])
    per_group, worst = metrics.group_accuracies(predictions, labels, torch.tensor([0, 1, 2, 2, 1]), 4)
    assert per_group[:3] == [1.0, 1.0, 0.5] and per_group[3] != per_group[3]
    assert worst == 0.5
    assert metrics.accuracy(torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0])) == 0.5


def test_module_entry_point_profile():
    # Outside the repository: `-m` puts the working directory first on sys.path, and from the
    # repository root that would import the uncompiled source tree, not the installed package.
    proc = subprocess.run([sys.executable, "-m", "aim", "profile", "--backbone", "resnet18", "--image-size", "64"],
                          capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert "added" in proc.stdout and "AIM[2] on resnet18 at 64x64" in proc.stdout


def test_user_errors_print_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    import aim.app.profiling
    from aim.errors import UsageError

    def fails_with(error):
        def command(args):
            raise error
        return command

    monkeypatch.setattr(aim.app.profiling, "command_profile", fails_with(UsageError("--backbone nope: unknown")))
    assert main(["profile"]) == 2
    assert capsys.readouterr().err == "aim profile: error: --backbone nope: unknown\n"
    # A ValueError that is not a UsageError is a bug: it propagates, traceback and all.
    monkeypatch.setattr(aim.app.profiling, "command_profile", fails_with(ValueError("not enough values to unpack")))
    with pytest.raises(ValueError, match="not enough values"):
        main(["profile"])
