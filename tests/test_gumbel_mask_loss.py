"""aim_kernels.mask_loss: the paper's per-stage (r - tau)^2 with r the active fraction."""
import pytest
import torch

import aim_kernels
from aim_kernels import mask_loss


def test_value_is_sum_of_squared_fraction_errors():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # r = 0.75
    b = torch.zeros(2, 1, 3, 3)                   # r = 0
    b[0, 0, 0, :] = 1.0                           # r = 3 / 18
    loss = mask_loss([a, b], [0.25, 0.5])
    expected = (0.75 - 0.25) ** 2 + (3 / 18 - 0.5) ** 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert mask_loss(a, 0.75).item() == 0.0
    assert mask_loss([a, a], 0.5).item() == pytest.approx(2 * 0.25**2)


def test_gradient_reaches_logits_through_straight_through_masks():
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    mask = aim_kernels.gumbel_binarize(logits, seed=1)
    loss = mask_loss(mask, 0.25)
    loss.backward()
    r = mask.detach().mean()
    # d loss / d mask = 2 (r - tau) / numel for every entry; the op maps it through soft'.
    assert torch.isfinite(logits.grad).all()
    if r != 0.25:
        assert (torch.sign(logits.grad) == torch.sign(r - 0.25)).all()


@pytest.mark.parametrize("masks,targets,error", [
    ([], 0.5, ValueError),
    ([torch.zeros(0)], 0.5, ValueError),
    ([torch.zeros(3, dtype=torch.int64)], 0.5, TypeError),
    ([torch.zeros(3)], [0.5, 0.5], ValueError),
    ([torch.zeros(3)], 1.5, ValueError),
    ([torch.zeros(3)], [True], ValueError),
])
def test_bad_input(masks, targets, error):
    with pytest.raises(error):
        mask_loss(masks, targets)
