"""Explanation-quality metrics of `aim report` (aim.analysis.faithfulness): deletion / insertion curves on
a model whose evidence is known, tie breaking, the grids of the grid pointing game and its score,
and the audit of a chosen target class it uses."""
import pytest
import torch
from torch import nn

from aim.analysis import audit, faithfulness
from aim.nn.backbones import BaselineClassifier, SmallConvNet

IDENTITY_ATOL = 1e-10  # float64 model: the audit's identity holds to rounding (tests/test_audit.py)


class RegionEvidence(nn.Module):
    """Two logits: 0 and 8 * (mean of the image over ``region`` - 0.5). Only the region's pixels matter."""

    def __init__(self, region):
        super().__init__()
        self.region = region

    def forward(self, images):
        evidence = 8 * (images[:, :, self.region].mean(dim=(1, 2)) - 0.5)
        return torch.stack([torch.zeros_like(evidence), evidence], dim=1)


def region_case():
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[:4, :4] = True
    images = region.float().expand(2, 3, 8, 8).clone()  # the region white, the rest black
    noise = 1e-3 * torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0))
    return RegionEvidence(region), images, region.float() + noise, (~region).float() + noise


def test_deletion_and_insertion_rank_a_faithful_map_above_its_opposite():
    model, images, faithful, opposite = region_case()
    targets = torch.ones(2, dtype=torch.long)
    good = faithfulness.deletion_insertion(model, images, faithful, targets, steps=8)
    bad = faithfulness.deletion_insertion(model, images, opposite, targets, steps=8)
    probability = lambda x: model(x).softmax(1)[:, 1]  # noqa: E731
    for result in (good, bad):
        assert torch.equal(result["fractions"], torch.linspace(0, 1, 9))
        assert result["deletion"][:, 0] == pytest.approx(probability(images))          # nothing removed
        assert result["deletion"][:, -1] == pytest.approx(probability(torch.zeros_like(images)))
        assert result["insertion"][:, 0] == pytest.approx(probability(faithfulness._blur(images)))
        assert result["insertion"][:, -1] == pytest.approx(probability(images))        # everything inserted
        for name in ("deletion", "insertion"):
            assert torch.allclose(result[f"{name}_auc"], torch.trapezoid(result[name], result["fractions"], dim=1))
    assert (good["deletion_auc"] < bad["deletion_auc"] - 0.3).all()
    assert (good["insertion_auc"] > bad["insertion_auc"] + 0.1).all()
    # The region is a quarter of the image: after 2 of 8 steps the faithful map has removed all of it.
    assert good["deletion"][:, 2] == pytest.approx(probability(torch.zeros_like(images)))


def test_ties_are_broken_in_one_seeded_random_order():
    flat = torch.zeros(2, 6, 6)
    flat[:, 0, 0] = 1.0
    ranks = faithfulness.saliency_ranks(flat, seed=0)
    assert torch.equal(ranks.sort(1).values, torch.arange(36).expand(2, -1))  # a permutation per image
    assert (ranks[:, 0] == 0).all()  # the most salient pixel first
    assert torch.equal(ranks, faithfulness.saliency_ranks(flat, seed=0))
    assert not torch.equal(ranks[0], torch.arange(36))  # not top-left first
    assert not torch.equal(ranks, faithfulness.saliency_ranks(flat, seed=1))


def test_grids_hold_distinct_classes_that_visit_every_cell():
    images = torch.arange(9, dtype=torch.float32).view(9, 1, 1, 1).expand(9, 3, 4, 4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    candidates = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])  # image 8 (the third of class 2) is no candidate
    grids, targets = faithfulness.make_grids(images, labels, candidates, 3, max_grids=10)
    assert faithfulness.grid_layout(3) == (1, 3) and faithfulness.grid_layout(2) == (1, 2) and faithfulness.grid_layout(7) == (2, 2)
    # Two candidates of class 2: two grids, the classes rotated through the cells.
    assert targets.tolist() == [[0, 1, 2], [1, 2, 0]]
    assert grids.shape == (2, 3, 4, 12)
    # Cell k of a grid is the next unused image of its class: grid 1 = images 4 (class 1), 5 (class 2), 3 (class 0).
    assert grids[1, 0, 0, ::4].tolist() == [4.0, 5.0, 3.0]
    with pytest.raises(ValueError, match="two classes"):
        faithfulness.grid_layout(1)
    assert faithfulness.make_grids(images, labels, torch.tensor([0, 3]), 3, max_grids=10) == (None, None)


def test_grid_pointing_game_is_the_share_of_positive_energy_in_the_explained_cell():
    targets = torch.tensor([[0, 1], [1, 0]])
    grids = targets.float().repeat_interleave(4, dim=1).view(2, 1, 1, 8).expand(2, 3, 4, 8)  # each cell holds its class

    def in_the_cell(model, images, explained):  # energy where the image shows the explained class, negative elsewhere
        return torch.where(images[:, 0] == explained.view(-1, 1, 1).float(), 1.0, -1.0)

    # batch_size 3: the four inputs in two batches that split a grid.
    assert torch.equal(faithfulness.grid_pointing_game(None, grids, targets, in_the_cell, (1, 2), batch_size=3), torch.ones(2, 2))
    uniform = faithfulness.grid_pointing_game(None, grids, targets, lambda m, x, t: torch.ones(len(x), 4, 8), (1, 2))
    assert torch.allclose(uniform, torch.full((2, 2), 0.5))
    negative = faithfulness.grid_pointing_game(None, grids, targets, lambda m, x, t: -torch.ones(len(x), 4, 8), (1, 2))
    assert torch.equal(negative, torch.zeros(2, 2))  # no positive energy: 0


def test_audit_of_a_chosen_target_sums_to_its_margin_over_its_strongest_rival():
    model = BaselineClassifier(SmallConvNet(), 3).double().eval()
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 1])
    result = audit.decision_contributions(model, x, targets=targets)
    logits = model(x)
    rival = logits.scatter(1, targets.view(-1, 1), float("-inf")).argmax(1)
    assert torch.equal(result["predicted"], targets) and torch.equal(result["runner_up"], rival)
    margin = logits.gather(1, targets.view(-1, 1))[:, 0] - logits.gather(1, rival.view(-1, 1))[:, 0]
    torch.testing.assert_close(result["contributions"].sum((1, 2)) + result["bias"], margin, atol=IDENTITY_ATOL, rtol=0)
    pixels = faithfulness.decision_map(model, x, targets)
    assert pixels.shape == (4, 32, 32)
    grids = torch.cat([x[:2], x[2:]], dim=3)  # (2, 3, 32, 64): two 1 x 2 grids
    scores = faithfulness.grid_pointing_game(model, grids, torch.tensor([[0, 1], [2, 1]]), faithfulness.decision_map, (1, 2))
    assert scores.shape == (2, 2) and ((scores >= 0) & (scores <= 1)).all()
