"""Both ops under every autograd and tracing mode: double backward, needs_input_grad,
torch.func, autocast, the fallback path's layout and opcheck, fake-kernel checks, FX
(symbolic_trace, create_feature_extractor) and torch.export of aim.AIM."""
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, vjp, vmap

import aim
import aim_kernels
from aim_kernels import reference
from device_matrix import cpu_and_cuda
from tolerances import TOLERANCE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def merge_inputs(mask_c, with_prev, dtype=torch.float64, channels_last=False, device="cpu"):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    feat = torch.randn(2, 3, 5, 4, dtype=dtype, device=device).contiguous(memory_format=fmt)
    mask = torch.rand(2, mask_c, 5, 4, dtype=dtype, device=device).contiguous(memory_format=fmt)
    prev = torch.randn(2, 3, 3, 2, dtype=dtype, device=device).contiguous(memory_format=fmt) if with_prev else None
    return feat, mask, prev


def independent_merge(feat, mask, prev):
    """The forward from torch ops (not aim_kernels.reference, which is also the fallback)."""
    out = feat * mask
    return out if prev is None else out + F.interpolate(prev, size=feat.shape[-2:], mode="nearest")


SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(("feat", "mask", "prev"), r)]


# ---- double backward ---------------------------------------------------------------------

@pytest.mark.parametrize("needs", SUBSETS, ids="+".join)
@pytest.mark.parametrize("mask_c", [1, 3], ids=["broadcast", "full"])
@cpu_and_cuda
def test_topdown_merge_gradgradcheck(needs, mask_c, device):
    tensors = dict(zip(("feat", "mask", "prev"), merge_inputs(mask_c, True, device=device)))
    for name in needs:
        tensors[name].requires_grad_()
    assert torch.autograd.gradgradcheck(lambda f, m, p: aim_kernels.topdown_merge(f, m, p),
                                        (tensors["feat"], tensors["mask"], tensors["prev"]))


def test_topdown_merge_gradgradcheck_without_prev():
    feat, mask, _ = merge_inputs(1, False)
    assert torch.autograd.gradgradcheck(aim_kernels.topdown_merge, (feat.requires_grad_(), mask.requires_grad_()))


def test_topdown_merge_second_derivative_values():
    # d/d mask of sum(grad_feat**2) = d/d mask sum((g * mask)**2): compared with eager ops.
    feat, mask, prev = (t.requires_grad_() for t in merge_inputs(1, True))
    for merge in (aim_kernels.topdown_merge, independent_merge):
        out = merge(feat, mask, prev)
        g_feat, g_mask = torch.autograd.grad((out ** 2).sum(), (feat, mask), create_graph=True)
        penalty = (g_feat ** 2).sum() + (g_mask ** 3).sum()
        result = torch.autograd.grad(penalty, (feat, mask, prev))
        if merge is aim_kernels.topdown_merge:
            got = result
    for a, b in zip(got, result):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
@cpu_and_cuda
def test_gumbel_gradgradcheck(training, device):
    logits = (torch.randn(2, 1, 4, 5, dtype=torch.float64, device=device) * 2).requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda a: aim_kernels.gumbel_binarize(a, 0.7, training=training, seed=9, offset=2), (logits,))


def test_gumbel_second_derivative_closed_form():
    logits = (torch.randn(50, dtype=torch.float64) * 2).requires_grad_()
    t, seed, offset = 0.6, 3, 1
    (g,) = torch.autograd.grad(aim_kernels.gumbel_binarize(logits, t, seed=seed, offset=offset).sum(), logits,
                               create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), logits)
    s = torch.sigmoid((logits.detach() + reference.logistic_noise(50, seed, offset).double()) / t)
    torch.testing.assert_close(gg, s * (1 - s) * (1 - 2 * s) / t**2, rtol=1e-12, atol=1e-14)


# ---- needs_input_grad --------------------------------------------------------------------

@pytest.mark.parametrize("needs", SUBSETS, ids="+".join)
@pytest.mark.parametrize("mask_c", [1, 3], ids=["broadcast", "full"])
@cpu_and_cuda
def test_topdown_merge_saves_and_computes_only_what_is_needed(needs, mask_c, device):
    tensors = dict(zip(("feat", "mask", "prev"), merge_inputs(mask_c, True, device=device)))
    for name in needs:
        tensors[name].requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = aim_kernels.topdown_merge(tensors["feat"], tensors["mask"], tensors["prev"])
    # grad_feat needs mask, grad_mask needs feat, grad_prev only prev's size.
    expected = [tensors[other] for name, other in (("feat", "mask"), ("mask", "feat")) if name in needs]
    assert sorted(t.numel() * t.element_size() for t in saved) == sorted(t.numel() * t.element_size() for t in expected)
    g = torch.randn_like(out)
    inputs = [tensors[name] for name in needs]
    got = torch.autograd.grad(out, inputs, g)
    want = torch.autograd.grad(independent_merge(tensors["feat"], tensors["mask"], tensors["prev"]), inputs, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
@cpu_and_cuda
def test_backward_op_skips_gradients_not_asked_for(channels_last, device):
    feat, mask, _ = merge_inputs(1, False, channels_last=channels_last, device=device)
    g = torch.randn_like(feat)
    op = torch.ops.aim_kernels.topdown_merge_backward
    full = op(g, feat, mask, 1, [2, 2])
    only_prev = op(g, None, None, 1, [2, 2])
    only_mask = op(g, feat, None, 1, [])
    only_feat = op(g, None, mask, 1, [])
    assert only_prev[0].numel() == only_prev[1].numel() == 0 and torch.equal(only_prev[2], full[2])
    assert torch.equal(only_mask[1], full[1]) and only_mask[0].numel() == only_mask[2].numel() == 0
    assert torch.equal(only_feat[0], full[0]) and only_feat[1].numel() == 0


def test_inplace_on_feat_after_merge_when_feat_needs_no_grad():
    # The repro: feat is modified in place after the merge; feat's value is not needed
    # by any gradient (mask is constant), so eager PyTorch runs and so must the op.
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    prev = torch.randn(2, 3, 2, 2, requires_grad=True)
    feat = x * 1
    out = aim_kernels.topdown_merge(feat, torch.ones(2, 1, 4, 4), prev)
    feat.mul_(2)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # the merge saw feat before the mul_
    torch.testing.assert_close(prev.grad, torch.full_like(prev, 4.0))  # x2 nearest: 4 outputs per source pixel


# ---- torch.func --------------------------------------------------------------------------

def test_topdown_merge_torch_func():
    feat, mask, prev = merge_inputs(1, True)
    args = (feat, mask, prev)
    for fn in (lambda f, m, p: aim_kernels.topdown_merge(f, m, p).square().sum(),
               lambda f, m, p: independent_merge(f, m, p).square().sum()):
        got = grad(fn, argnums=(0, 1, 2))(*args)
        if fn.__code__.co_names[0] == "aim_kernels":
            mine = got
    for a, b in zip(mine, got):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    out, pullback = vjp(aim_kernels.topdown_merge, *args)
    g = torch.randn_like(out)
    ref_out, ref_pullback = vjp(independent_merge, *args)
    for a, b in zip(pullback(g), ref_pullback(g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(jacrev(aim_kernels.topdown_merge, argnums=(0, 1, 2))(*args), jacrev(independent_merge, argnums=(0, 1, 2))(*args)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_topdown_merge_vmap_uses_batching_rule(recwarn):
    batch = [merge_inputs(3, True) for _ in range(4)]
    stacked = [torch.stack(ts) for ts in zip(*batch)]
    out = vmap(aim_kernels.topdown_merge)(*stacked)
    assert not [w for w in recwarn if "fallback" in str(w.message).lower()]
    for i, (f, m, p) in enumerate(batch):
        assert torch.equal(out[i], independent_merge(f, m, p))
    # one input not batched, grad under vmap (per-sample gradients)
    mask = batch[0][1]
    per_sample = vmap(grad(lambda f, p: aim_kernels.topdown_merge(f, mask, p).square().sum(), argnums=(0, 1)))(stacked[0], stacked[2])
    for i, (f, _, p) in enumerate(batch):
        expected = grad(lambda f, p: independent_merge(f, mask, p).square().sum(), argnums=(0, 1))(f, p)
        for a, b in zip(per_sample, expected):
            torch.testing.assert_close(a[i], b, rtol=1e-12, atol=1e-12)


def test_gumbel_torch_func():
    logits = torch.randn(3, 1, 4, 5, dtype=torch.float64)
    seed, offset, t = 11, 4, 0.8
    got = grad(lambda a: (aim_kernels.gumbel_binarize(a, t, seed=seed, offset=offset) * a).sum())(logits)
    hard = reference.gumbel_binarize(logits, t, True, torch.tensor(seed), offset)
    st = reference.gumbel_binarize_backward(logits, logits, t, True, torch.tensor(seed), offset)
    torch.testing.assert_close(got, hard + st, rtol=1e-12, atol=1e-14)
    # vmap: every sample is its own call with the same (seed, offset)
    batch = torch.randn(4, 2, 1, 3, 3)
    out = vmap(lambda a: aim_kernels.gumbel_binarize(a, seed=seed, offset=offset))(batch)
    for i in range(4):
        assert torch.equal(out[i], aim_kernels.gumbel_binarize(batch[i], seed=seed, offset=offset))
    out = vmap(lambda a: aim_kernels.gumbel_binarize(a, training=False))(batch)
    assert torch.equal(out, (batch >= 0).float())
    jac = jacrev(lambda a: aim_kernels.gumbel_binarize(a, t, seed=seed, offset=offset))(logits[0, 0, 0])
    d = reference.gumbel_binarize_backward(torch.ones(5, dtype=torch.float64), logits[0, 0, 0], t, True, torch.tensor(seed), offset)
    torch.testing.assert_close(jac, torch.diag(d), rtol=1e-12, atol=1e-14)


# ---- autocast ----------------------------------------------------------------------------

def test_autocast_promotes_like_eager():
    feat, mask, prev = merge_inputs(1, True, dtype=torch.float32)
    feat16 = feat.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aim_kernels.topdown_merge(feat16, mask, prev)
        expected = independent_merge(feat16, mask, prev)
    assert out.dtype == expected.dtype == torch.float32
    assert torch.equal(out, expected)


def test_autocast_inside_torch_func_grad():
    # autocast's promotion rule and the functorch transforms compose: the same gradients (dtypes
    # exactly; values within float32 rounding, since grad_mask and grad_prev are sums over
    # channels and footprints taken in another order than eager's) as autocast over torch ops.
    feat, mask, prev = merge_inputs(1, True, dtype=torch.float32)
    feat16 = feat.bfloat16()

    def loss(merge):
        def fn(f, m, p):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return merge(f, m, p).square().sum()
        return fn

    got = grad(loss(aim_kernels.topdown_merge), argnums=(0, 1, 2))(feat16, mask, prev)
    expected = grad(loss(independent_merge), argnums=(0, 1, 2))(feat16, mask, prev)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])
    logits = torch.randn(2, 1, 4, 5, dtype=torch.bfloat16)

    def gumbel_loss(a):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (aim_kernels.gumbel_binarize(a, seed=3) * a).float().sum()

    plain = torch.func.grad(lambda a: (aim_kernels.gumbel_binarize(a, seed=3) * a).float().sum())(logits)
    assert torch.equal(torch.func.grad(gumbel_loss)(logits), plain)


def test_autocast_aim_training_step_bf16():
    torch.manual_seed(0)
    model = aim.AIM("resnet18", num_classes=2, depth=2)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
        loss = aim.AIMLoss()(out, labels, 0.5).total
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.topdown.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in (p.grad for p in model.topdown.mask_estimators.parameters()))


# ---- fake kernels and the fallback path --------------------------------------------------

@pytest.mark.parametrize("args", [
    lambda: (torch.empty(2, 3, 4, 4), torch.empty(2, 2, 4, 4), None),
    lambda: (torch.empty(2, 3, 4, 4), torch.empty(2, 1, 4, 4), torch.empty(2, 3, 5, 4)),
    lambda: (torch.empty(2, 3, 4, 4), torch.empty(2, 1, 4, 4, dtype=torch.float64), None),
], ids=["mask-channels", "prev-larger", "dtype"])
def test_fake_kernel_checks_inputs(args):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = tuple(None if a is None else torch.empty_like(a) for a in args())
        with pytest.raises(RuntimeError, match="topdown_merge"):
            torch.ops.aim_kernels.topdown_merge(*fake)


def test_fake_gumbel_checks_seed():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        with pytest.raises(RuntimeError, match="seed"):
            torch.ops.aim_kernels.gumbel_binarize(torch.empty(3), 1.0, True, None, 0)


FALLBACK_CHECKS = textwrap.dedent("""
    import torch, aim_kernels
    from aim_kernels import _extension
    assert not _extension.EXT_LOADED
    permuted = torch.randn(2, 3, 5, 4).transpose(2, 3)  # dense, neither layout
    samples = [
        (permuted, torch.rand(2, 1, 4, 5), torch.randn(2, 3, 2, 3)),
        (torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), torch.rand(2, 3, 4, 5), None),
    ]
    for feat, mask, prev in samples:
        for t in (feat, mask, prev):
            if t is not None:
                t.requires_grad_()
        torch.library.opcheck(torch.ops.aim_kernels.topdown_merge.default, (feat, mask, prev))
        g = torch.randn(feat.shape)
        torch.library.opcheck(torch.ops.aim_kernels.topdown_merge_backward.default,
                              (g, feat.detach(), mask.detach(), mask.shape[1], [] if prev is None else list(prev.shape[2:])))
        torch.library.opcheck(torch.ops.aim_kernels.topdown_merge_backward.default, (g, None, mask.detach(), mask.shape[1], []))
        expected = feat * mask + (0 if prev is None else torch.nn.functional.interpolate(prev, size=feat.shape[-2:]))
        assert torch.equal(aim_kernels.topdown_merge(feat, mask, prev), expected)
    logits = torch.randn(2, 3, 5, 4).transpose(2, 3).requires_grad_()
    torch.library.opcheck(torch.ops.aim_kernels.gumbel_binarize.default, (logits, 0.5, True, torch.tensor(3), 1))
    compiled = torch.compile(lambda f, m: aim_kernels.topdown_merge(f, m) * 2, fullgraph=True)
    assert torch.equal(compiled(permuted, samples[0][1].detach()), permuted * samples[0][1].detach() * 2)
    print("fallback ok")
""")


def test_fallback_path_layout_and_opcheck(tmp_path):
    env = dict(os.environ, AIM_KERNELS_DISABLE_EXT="1", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", FALLBACK_CHECKS], env=env, capture_output=True,
                            text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0 and "fallback ok" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


# ---- FX and export -----------------------------------------------------------------------

class BackboneWithTopDown(torch.nn.Module):
    def __init__(self, sparse_eval=True):
        super().__init__()
        import torchvision

        self.body = torchvision.models._utils.IntermediateLayerGetter(
            torchvision.models.resnet18(), {"layer2": "s1", "layer3": "s2", "layer4": "s3"})
        self.topdown = aim.FusedTopDownMask([128, 256, 512], 16, depth=2, mask_hidden_channels=8, sparse_eval=sparse_eval)

    def forward(self, x):
        return self.topdown(self.body(x))


# In eval mode the pathway merges with masked_conv2d (sparse_eval, the default) or with the
# dense lateral conv and topdown_merge.
MERGE_OPS = {True: aim_kernels.masked_conv2d, False: aim_kernels.topdown_merge}


@pytest.mark.parametrize("sparse_eval", [True, False])
def test_fx_symbolic_trace_keeps_ops_as_leaves(sparse_eval):
    model = BackboneWithTopDown(sparse_eval).eval()
    traced = torch.fx.symbolic_trace(model)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert targets.count(MERGE_OPS[sparse_eval]) == 2 and targets.count(aim_kernels.gumbel_binarize) == 2
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    for name, value in traced(x).items():
        assert torch.equal(value, expected[name])


@pytest.mark.parametrize("sparse_eval", [True, False])
def test_create_feature_extractor(sparse_eval):
    from torchvision.models.feature_extraction import create_feature_extractor

    model = BackboneWithTopDown(sparse_eval).eval()
    # the last fused merge (the finest stage the depth-2 pathway reaches) as a node of its own;
    # train mode always merges with topdown_merge
    nodes = {"body.layer3": "c4"}
    extractor = create_feature_extractor(
        model, train_return_nodes={**nodes, "topdown.topdown_merge_1": "fused"},
        eval_return_nodes={**nodes, f"topdown.{MERGE_OPS[sparse_eval].__name__}_1": "fused"})
    x = torch.randn(1, 3, 64, 64)
    out = extractor(x)
    assert set(out) == {"c4", "fused"}
    assert torch.equal(out["c4"], model.body(x)["s2"])
    assert torch.equal(out["fused"], model(x)["s2"])


def test_torch_export_aim_eval():
    model = aim.AIM("resnet18", num_classes=2, depth=2).eval()
    x = torch.randn(2, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    got, expected = exported.module()(x), model(x)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    for name in expected.masks:
        assert torch.equal(got.masks[name], expected.masks[name])
