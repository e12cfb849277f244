"""The AIM top-down masking pathway: a drop-in for torchvision.ops.FeaturePyramidNetwork.

Per top-down stage l (coarsest first), as in shared/DESIGN.md:

    A_l = M_l(S_l)                   mask estimator -> one logit channel
                                     (M_l([S_l, up(F_l+1)]) with mask_topdown_context)
    B_l = gumbel_binarize(A_l)       {0,1}, straight-through gradient
    F_l = T_l(S_l) * B_l + up(F_l+1) topdown_merge (one fused op)
"""
import math
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import nn

import aim_kernels
from aim_kernels import reference
from aim_kernels.gumbel_binarize import draw_seed

# The mask loss anneals tau from 1.0 (fully active) down to the target, so the masks start
# mostly active: sigmoid(2.0) = 88% of positions pass the Gumbel threshold at initialization,
# while the straight-through gradient sigmoid' (0.10 at logit 2) is still far from vanishing.
INITIAL_MASK_LOGIT = 2.0
SALIENCY_WEIGHT = 2.0  # initial weight of the saliency prior: active where z > -1 at the initial logit
POOLINGS = ("all", "active")
MASK_BUDGETS = ("loss", "eval", "fixed")
MASK_ESTIMATORS = ("dense", "separable")


def reference_gumbel_binarize(logits, temperature=1.0, *, training=True):
    """Plain-PyTorch ``aim_kernels.gumbel_binarize(logits, temperature, training=training)``.

    The seed comes from the op's own ``draw_seed``, so after the same ``torch.manual_seed``
    both paths sample bit-identical masks."""
    seed = draw_seed(logits.device) if training else None
    return reference.gumbel_binarize_straight_through(logits, float(temperature), training, seed, 0)


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus identity, then ReLU (ResNet basic block, fixed width)."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)

    def conv_bn_pairs(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]

    def foldable(self):
        return True  # its convs are the pairs, checked by MaskEstimator._folded_convs

    def folded_forward(self, x, folded):
        """forward with ``folded`` = the (weight, bias) of conv_bn_pairs, BatchNorm folded in."""
        (w1, b1), (w2, b2) = folded
        out = nn.functional.conv2d(x, w1, b1, padding=1).relu_()
        return nn.functional.conv2d(out, w2, b2, padding=1).add_(x).relu_()


class SeparableResidualBlock(nn.Module):
    """ResidualBlock with each 3x3 conv depthwise-separable (Xception's: depthwise 3x3, then
    pointwise 1x1, BatchNorm after the pair): the same receptive field at 1/8-1/9 of the
    multiply-adds for 128 channels (9C + C^2 per position instead of 9C^2)."""

    def __init__(self, channels):
        super().__init__()
        self.depthwise1 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.pointwise1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.depthwise2 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.pointwise2 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.pointwise1(self.depthwise1(x))))
        return self.relu(self.bn2(self.pointwise2(self.depthwise2(out))) + x)

    def conv_bn_pairs(self):
        return [(self.pointwise1, self.bn1), (self.pointwise2, self.bn2)]

    def foldable(self):
        channels = self.bn1.num_features
        return all(type(m) is nn.Conv2d and m.bias is None and m.groups == channels and m.padding == (1, 1)
                   and m.stride == (1, 1) and m.dilation == (1, 1) for m in (self.depthwise1, self.depthwise2))

    def folded_forward(self, x, folded):
        """forward with ``folded`` = the (weight, bias) of conv_bn_pairs, BatchNorm folded into
        the pointwise convs (the depthwise ones run as they are)."""
        conv = nn.functional.conv2d
        (w1, b1), (w2, b2) = folded
        channels = x.shape[1]
        out = conv(conv(x, self.depthwise1.weight, None, padding=1, groups=channels), w1, b1).relu_()
        return conv(conv(out, self.depthwise2.weight, None, padding=1, groups=channels), w2, b2).add_(x).relu_()


class MaskEstimator(nn.Module):
    """M_l: a stem conv, residual blocks, a global-average-pool branch, 1x1 conv to one logit channel.

    ``kind`` "dense" (the paper's): a 3x3 stem conv and ResidualBlocks. "separable": a 1x1 stem
    conv (the input's many channels -- S_l and the upsampled context -- projected per position)
    and SeparableResidualBlocks, so the spatial context comes from the blocks' depthwise 3x3
    convs: about 1/10 of the dense estimator's multiply-adds at 128 channels
    (docs/performance.md).

    The pool branch (pool -> linear -> one scalar per image) is added to the logit map at every
    position: it lets image-level context shift the whole mask up or down, which the mask loss
    on the active fraction needs. Adding it to the logit rather than to the hidden map before the
    1x1 conv is the same function class (the 1x1 conv is linear) with fewer parameters.

    Inference speed (eval mode, the same function up to rounding): on CPU the input is made
    channels_last (``eval_channels_last``), and under no_grad each conv-BatchNorm pair runs as
    one convolution with the BatchNorm folded in (``fold_batchnorm``): the stem and block
    submodules are then bypassed, so forward hooks on them do not run; set the attribute to
    False to run them.
    """

    def __init__(self, in_channels, hidden_channels=128, num_blocks=3, initial_logit=INITIAL_MASK_LOGIT,
                 saliency_channels=None, kind="dense"):
        super().__init__()
        if kind not in MASK_ESTIMATORS:
            raise ValueError(f"kind must be one of {', '.join(MASK_ESTIMATORS)}, got {kind!r}")
        self.kind = kind
        stem_size = 3 if kind == "dense" else 1
        block = ResidualBlock if kind == "dense" else SeparableResidualBlock
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, stem_size, padding=stem_size // 2, bias=False),
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.Sequential(*[block(hidden_channels) for _ in range(num_blocks)])
        self.global_branch = nn.Linear(hidden_channels, 1)
        self.to_logit = nn.Conv2d(hidden_channels, 1, 1)
        nn.init.constant_(self.to_logit.bias, initial_logit)
        # Saliency prior: the first saliency_channels input channels (S_l) add w * z to the logit,
        # z the per-image standardized log energy of S_l at each position, w learned.
        self.saliency_channels = saliency_channels
        self.saliency_weight = nn.Parameter(torch.tensor(SALIENCY_WEIGHT)) if saliency_channels else None
        # Inference speed switches (same function up to rounding; tests/test_estimator_speed.py).
        self.eval_channels_last = True
        self.fold_batchnorm = True
        self._folded = None  # (key, folded (weight, bias) per conv-BatchNorm pair): see _folded_convs

    def _folded_convs(self):
        """Per conv-BatchNorm pair of stem and blocks, in order, (weight, bias) with its eval-mode
        BatchNorm folded in: W * s, beta - mean * s, s = gamma / sqrt(var + eps). Cached until a
        parameter or running statistic changes (in place: its version; replaced: its storage).
        None when the layers are not the ones __init__ built (swapped by a user) or under a compiler."""
        if torch.compiler.is_compiling():
            return None
        if (len(self.stem) != 3 or type(self.stem[2]) is not nn.ReLU
                or any(type(b) not in (ResidualBlock, SeparableResidualBlock) or not b.foldable() for b in self.blocks)):
            return None
        pairs = [(self.stem[0], self.stem[1])] + [p for b in self.blocks for p in b.conv_bn_pairs()]
        tensors = []
        for conv, bn in pairs:
            same_size = (conv.padding[0] * 2 + 1, conv.padding[1] * 2 + 1) == conv.kernel_size
            if (type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d or conv.bias is not None or bn.running_var is None
                    or not bn.affine or not same_size or (conv.stride, conv.dilation, conv.groups) != ((1, 1), (1, 1), 1)):
                return None
            tensors += [conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        if self._folded is None or self._folded[0] != key:
            folded = []
            for conv, bn in pairs:
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                folded.append((conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale))
            self._folded = (key, folded)
        return self._folded[1]

    def _folded_hidden(self, x, folded):
        """``blocks(stem(x))`` with the BatchNorms folded into the convolutions (``folded``:
        _folded_convs), ReLU in place."""
        (weight, bias), rest = folded[0], folded[1:]
        hidden = nn.functional.conv2d(x, weight, bias, padding=self.stem[0].padding).relu_()
        for i, block in enumerate(self.blocks):
            hidden = block.folded_forward(hidden, rest[2 * i:2 * i + 2])
        return hidden

    def forward(self, x):
        if self.eval_channels_last and not self.training and isinstance(x, torch.Tensor) and x.device.type == "cpu":
            # oneDNN's CPU convolutions at these small maps (5x5 to 14x14, batch 8) run 1.07-1.19x
            # faster on channels_last input (docs/performance.md); the logit map, one channel, has
            # the same memory either way. Train mode stays NCHW: there it measured 0.93-1.06x.
            x = x.contiguous(memory_format=torch.channels_last)
        folded = self._folded_convs() if self.fold_batchnorm and not self.training and not torch.is_grad_enabled() else None
        hidden = self.blocks(self.stem(x)) if folded is None else self._folded_hidden(x, folded)
        global_shift = self.global_branch(hidden.mean(dim=(2, 3)))
        logit = self.to_logit(hidden) + global_shift[:, :, None, None]
        if self.saliency_weight is not None:
            logit = logit + self.saliency_weight * saliency(x[:, :self.saliency_channels]).to(logit.dtype)
        return logit


def saliency(stage):
    """(N, 1, H, W): the log of the mean squared activation of ``stage`` at each position,
    standardized over each image's positions, detached (the prior reads the features, it does
    not train them). Pretrained features are largest on objects: where the feature maps of
    SmallConvNet pretrained on the embedded set are in their top 25%, 75-85% of the object lies."""
    energy = stage.detach().float().square().mean(dim=1, keepdim=True).add(1e-6).log()
    mean = energy.mean(dim=(2, 3), keepdim=True)
    std = energy.std(dim=(2, 3), keepdim=True, correction=0).clamp_min(1e-6)
    return (energy - mean) / std


class TopDownResult(NamedTuple):
    """features: F_l per top-down stage; masks: B_l (N, 1, H_l, W_l); pooled_stage_outputs:
    global average of O_l = T_l(S_l) * B_l, (N, out_channels), or None when not requested.
    All three are OrderedDicts keyed by the input's stage names, finest first."""

    features: "OrderedDict[str, torch.Tensor]"
    masks: "OrderedDict[str, torch.Tensor]"
    pooled_stage_outputs: "OrderedDict[str, torch.Tensor] | None"


class FusedTopDownMask(nn.Module):
    """AIM's top-down masking pathway, a drop-in for ``torchvision.ops.FeaturePyramidNetwork``.

    ``forward`` takes an OrderedDict of NCHW stage maps, finest first, with ``in_channels_list[i]``
    channels each, and returns an OrderedDict of (N, out_channels, H, W) maps with the same keys
    -- the keys of the ``depth`` coarsest stages the pathway runs through (all of them when
    ``depth`` is None, exactly like FeaturePyramidNetwork).

    Args:
        in_channels_list: channels of every backbone stage, finest first.
        out_channels: common width of the lateral 1x1 convs T_l (and of the outputs).
        depth: how many of the coarsest stages the pathway runs through (AIM[depth, target]);
            None means all.
        temperature: Gumbel temperature of the straight-through gradient.
        target: mask-annealing target (fraction of active mask entries the training schedule
            anneals to; read by ``aim.MaskAnnealing.for_model``).
        mask_hidden_channels: width of the mask estimators.
        mask_blocks: residual blocks of each mask estimator (3, the paper's; fewer: cheaper).
        mask_estimator: "dense" (the paper's 3x3 convolutions) or "separable" (a 1x1 stem and
            depthwise-separable blocks, ~1/10 of the multiply-adds): ``MaskEstimator``'s kind.
        use_reference: run the plain-PyTorch reference ops (``aim_kernels.reference``) instead of
            the fused ops; same parameters and seed give the same outputs and gradients.
        sparse_eval: in eval mode, compute each lateral T_l only where its mask is active and
            merge in the same op (``aim_kernels.masked_conv2d``; the reference path runs the
            dense composition it is checked against). The masks are the same bits as the dense
            path's, the features equal within rounding. Train mode is unaffected.
        initial_mask_logit: initial bias of every mask estimator's logit (sigmoid of it: the
            expected active fraction at initialization).
        mask_topdown_context: every mask estimator below the coarsest stage reads S_l concatenated
            (channels) with the nearest-upsampled F_l+1, so the coarser stages' decisions guide
            the finer masks; False: M_l reads S_l alone (the paper's pathway). The masks then
            need the feature maps, so ``pooled_outputs`` runs the pathway rather than skip them.
        mask_saliency_prior: every mask estimator adds w * z(S_l) to its logit, z the per-image
            standardized log activation energy of S_l, w learned from SALIENCY_WEIGHT: as the
            mask loss lowers the active fraction, the positions where the (pretrained) features
            are weakest drop first. False: the paper's estimator.
        pooling: how the classifiers average a masked map: "all" (the paper's global average
            over every position, zeros included: the mask's area scales the pooled features, so
            the area can carry the class) or "active" (the mean over the active positions only:
            of B_l for a stage's O_l, of the union of the upsampled masks for F_depth; an empty
            mask pools to 0). The active count is a constant in the backward pass.
        mask_budget: how much of each stage a mask keeps. "loss" (the paper's): whatever the
            estimator decides, pulled towards tau by the mask loss in training -- so the area can
            differ between images, and then carry the class. "eval": trained so, but eval masks
            are exactly the round(f * H * W) highest logits of each image (ties broken by
            position), f the buffer ``active_fraction`` (the target, or the annealed tau the
            training loop sets): every image's masks have the same area, which then carries
            nothing, and none is empty. "fixed": the same in training too, the logits shifted per
            image to that quantile before the Gumbel threshold.

    Train mode samples Gumbel masks; eval mode thresholds the logits at 0. The masks of the last
    forward are kept (detached) in ``last_masks``; ``forward(x, return_masks=True)`` returns
    ``(features, masks)`` with the masks still in the autograd graph (for the mask loss).
    """

    def __init__(self, in_channels_list, out_channels, depth=None, temperature=1.0, target=0.25,
                 mask_hidden_channels=128, use_reference=False, sparse_eval=True,
                 initial_mask_logit=INITIAL_MASK_LOGIT, mask_topdown_context=False, pooling="all",
                 mask_saliency_prior=False, mask_budget="loss", mask_blocks=3, mask_estimator="dense"):
        super().__init__()
        in_channels_list = list(in_channels_list)
        if not in_channels_list or not all(isinstance(c, int) and c > 0 for c in in_channels_list):
            raise ValueError(f"in_channels_list must be a non-empty list of positive ints, got {in_channels_list}")
        if not isinstance(out_channels, int) or out_channels <= 0:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        num_stages = len(in_channels_list)
        if depth is None:
            depth = num_stages
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= num_stages:
            raise ValueError(f"depth must be an int in 1..{num_stages} (the number of stages in in_channels_list), got {depth!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
            raise ValueError(f"target must be a fraction in (0, 1], got {target!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if isinstance(mask_hidden_channels, bool) or not isinstance(mask_hidden_channels, int) or mask_hidden_channels < 1:
            raise ValueError(f"mask_hidden_channels must be a positive int, got {mask_hidden_channels!r}")
        if isinstance(mask_blocks, bool) or not isinstance(mask_blocks, int) or mask_blocks < 0:
            raise ValueError(f"mask_blocks must be an int >= 0, got {mask_blocks!r}")
        if mask_estimator not in MASK_ESTIMATORS:
            raise ValueError(f"mask_estimator must be one of {', '.join(MASK_ESTIMATORS)}, got {mask_estimator!r}")
        if mask_budget not in MASK_BUDGETS:
            raise ValueError(f"mask_budget must be one of {', '.join(MASK_BUDGETS)}, got {mask_budget!r}")
        self.pooling = pooling
        self.mask_budget = mask_budget
        if mask_budget != "loss":  # a buffer: checkpoints keep the fraction their masks were made at
            self.register_buffer("active_fraction", torch.tensor(float(target)))
        self.in_channels_list = in_channels_list
        self.out_channels = out_channels
        self.depth = depth
        self.temperature = float(temperature)
        self.target = float(target)
        self.use_reference = bool(use_reference)
        self.sparse_eval = bool(sparse_eval)
        self.mask_topdown_context = bool(mask_topdown_context)
        run_channels = in_channels_list[num_stages - depth:]
        # Index i of these lists is the i-th stage the pathway runs through, finest first.
        self.lateral = nn.ModuleList([nn.Conv2d(c, out_channels, 1) for c in run_channels])
        # The coarsest stage has no F_l+1: its estimator reads S_l alone either way.
        context_channels = [out_channels if self.mask_topdown_context and i < depth - 1 else 0 for i in range(depth)]
        self.mask_saliency_prior = bool(mask_saliency_prior)
        self.mask_estimators = nn.ModuleList([
            MaskEstimator(c + extra, mask_hidden_channels, num_blocks=mask_blocks, initial_logit=initial_mask_logit,
                          saliency_channels=c if self.mask_saliency_prior else None, kind=mask_estimator)
            for c, extra in zip(run_channels, context_channels)])
        self.last_masks = None
        # False: train mode thresholds the logits without Gumbel noise (straight-through gradient
        # kept), e.g. for the last epochs of training as DynConv does.
        self.gumbel_noise = True

    def extra_repr(self):
        return (f"in_channels_list={self.in_channels_list}, out_channels={self.out_channels}, depth={self.depth}, "
                f"temperature={self.temperature}, target={self.target}, use_reference={self.use_reference}, "
                f"sparse_eval={self.sparse_eval}, mask_topdown_context={self.mask_topdown_context}, pooling={self.pooling!r}, "
                f"mask_saliency_prior={self.mask_saliency_prior}, mask_budget={self.mask_budget!r}, "
                f"mask_estimator={self.mask_estimators[0].kind!r}")

    def forward(self, x, return_masks=False):
        result = self.run(x)
        self.last_masks = OrderedDict((name, mask.detach()) for name, mask in result.masks.items())
        if return_masks:
            return result.features, result.masks
        return result.features

    def run(self, x, pool_stage_outputs=False, masks=None):
        """The pathway with everything AIM training needs: a :class:`TopDownResult`.

        ``pool_stage_outputs`` also returns the global average of each O_l = T_l(S_l) * B_l,
        computed as a masked mean (one batched matmul) so O_l is never materialized apart from
        the fused merge. ``masks``: the B_l to use (a dict by stage name, as a result's masks)
        instead of estimating them from ``x``.
        """
        names = self._check_input(x)
        given = self._check_masks(masks, x, names)
        merge = reference.topdown_merge if self.use_reference else aim_kernels.topdown_merge
        masked_conv = reference.masked_conv2d if self.use_reference else aim_kernels.masked_conv2d
        sparse = self.sparse_eval and not self.training
        run_names = names[len(names) - self.depth:]
        features, masks, pooled = {}, {}, {}
        prev = None
        for i in reversed(range(self.depth)):
            stage = x[run_names[i]]
            if given is not None:
                mask = given[run_names[i]]
            else:
                mask = self._binarize(self.mask_estimators[i](self._mask_input(stage, prev)))
            if sparse:  # T_l only where the mask is active, fused with the merge
                # in the input's dtype, as autocast runs the dense path's conv (a custom op is not autocast)
                weight, bias = self.lateral[i].weight.to(stage.dtype), self.lateral[i].bias.to(stage.dtype)
                prev = masked_conv(stage, weight, bias, mask, prev)
            else:
                lateral = self.lateral[i](stage)
                prev = merge(lateral, mask, prev)
            features[run_names[i]] = prev
            masks[run_names[i]] = mask
            if pool_stage_outputs:
                divisor = self._pool_divisor([mask], mask.shape[-2:])
                if sparse:  # the lateral map was never materialized: pool through the 1x1 conv
                    pooled[run_names[i]] = pooled_lateral(self.lateral[i], stage, mask / divisor[:, :, None, None])
                else:
                    masked_sum = torch.bmm(lateral.flatten(2), mask.flatten(2).transpose(1, 2)).squeeze(2)
                    pooled[run_names[i]] = masked_sum / divisor
        return TopDownResult(
            _ordered(features, run_names), _ordered(masks, run_names), _ordered(pooled, run_names) if pool_stage_outputs else None
        )

    def pooled_outputs(self, x, masks=None):
        """The global averages AIM's classifiers read, without computing any feature map:
        ``(masks, pooled_stage_outputs, pooled_final)``, pooled_final the global average of
        F_depth, (N, out_channels). ``masks`` as in :meth:`run`.

        Exact (up to rounding) because everything after the masks is linear: the global average
        of F_depth = sum over stages of upsampled O_l = T_l(S_l) * B_l weighs each position of
        stage l by how many F_depth positions its nearest-upsampling footprint covers, and a
        weighted spatial sum commutes with the 1x1 conv T_l: W (sum_p g(p) B(p) S(p)) + b sum_p g(p) B(p).
        So per stage only the masked, weighted sum of S_l is computed (one batched matmul).
        """
        if self.mask_topdown_context and masks is None:  # the masks read F_l+1: the feature maps are needed anyway
            result = self.run(x, pool_stage_outputs=True)
            return result.masks, result.pooled_stage_outputs, self.pool_final(result.features, result.masks)
        names = self._check_input(x)
        given = self._check_masks(masks, x, names)
        run_names = names[len(names) - self.depth:]
        final_size = x[run_names[0]].shape[-2:]
        if given is not None:
            masks = [given[name] for name in run_names]
        else:
            masks = [self._binarize(self.mask_estimators[i](x[name])) for i, name in enumerate(run_names)]
        final_divisor = self._pool_divisor(masks, final_size)[:, :, None, None]
        pooled, pooled_final = {}, 0
        for i, (name, mask) in enumerate(zip(run_names, masks)):
            stage = x[name]
            h, w = mask.shape[-2:]
            pooled[name] = pooled_lateral(self.lateral[i], stage, mask / self._pool_divisor([mask], (h, w))[:, :, None, None])
            sizes = [x[n].shape[-2:] for n in reversed(run_names[:i])]  # the upsampling steps down to F_depth
            footprint = footprint_counts((h, w), sizes).to(device=mask.device, dtype=mask.dtype)
            pooled_final = pooled_final + pooled_lateral(self.lateral[i], stage, mask * footprint / final_divisor)
        return _ordered(dict(zip(run_names, masks)), run_names), _ordered(pooled, run_names), pooled_final

    def pool_final(self, features, masks):
        """What the final classifier reads: the average of F_depth (the first of ``features``)
        per ``pooling``, (N, out_channels)."""
        final = next(iter(features.values()))
        if self.pooling == "all":
            return final.mean(dim=(2, 3))
        return final.sum(dim=(2, 3)) / self._pool_divisor(list(masks.values()), final.shape[-2:])

    def _pool_divisor(self, masks, size):
        """(N, 1): the number of positions a map of ``size`` is averaged over. "all": every
        position; "active": those where any of ``masks`` (nearest-upsampled to ``size``) is on,
        at least 1 (an empty mask's map is 0 and pools to 0)."""
        n = masks[0].shape[0]
        if self.pooling == "all":
            return masks[0].new_full((n, 1), size[0] * size[1])  # no float(): under FX the size is a Proxy
        union = None
        for mask in masks:
            up = torch.nn.functional.interpolate(mask.detach(), size=tuple(size), mode="nearest") if tuple(mask.shape[-2:]) != tuple(size) else mask.detach()
            union = up if union is None else torch.maximum(union, up)
        return (union != 0).flatten(1).sum(1, keepdim=True).to(masks[0].dtype).clamp_min(1)

    def _binarize(self, logits):
        """B_l from M_l's logits: Gumbel straight-through in train mode (thresholded without
        noise when ``gumbel_noise`` is off), thresholded at 0 in eval mode; per ``mask_budget``,
        the top ``active_fraction`` of them in eval mode and the logits shifted to each image's
        quantile in train mode."""
        if self.mask_budget != "loss" and not self.training:
            return top_fraction_mask(logits, self.active_fraction)
        if self.mask_budget == "fixed":
            logits = logits - budget_threshold(logits, self.active_fraction)
        binarize = reference_gumbel_binarize if self.use_reference else aim_kernels.gumbel_binarize
        return binarize(logits, self.temperature, training=self.training and self.gumbel_noise)

    def _mask_input(self, stage, prev):
        """What M_l reads: S_l, or with mask_topdown_context S_l and up(F_l+1) (the merge's upsampling)."""
        if not self.mask_topdown_context or prev is None:
            return stage
        return torch.cat([stage, torch.nn.functional.interpolate(prev, size=stage.shape[-2:], mode="nearest")], dim=1)

    def _check_masks(self, masks, x, names):
        """``masks`` given to :meth:`run`: one (N, 1, H_l, W_l) map per stage the pathway runs through."""
        if masks is None:
            return None
        if not isinstance(masks, dict):
            raise TypeError(f"masks must be a dict of masks by stage name, got {type(masks).__name__}")
        run_names = names[len(names) - self.depth:]
        if sorted(masks) != sorted(run_names):
            raise ValueError(f"masks must have one mask per stage the pathway runs through ({run_names}), got {list(masks)}")
        for name in run_names:
            stage, mask = x[name], masks[name]
            if isinstance(stage, torch.fx.Proxy) or isinstance(mask, torch.fx.Proxy):
                continue
            expected = (stage.shape[0], 1, *stage.shape[-2:])
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != expected:
                raise ValueError(f"mask {name!r} must have shape {expected} (stage {name!r}'s), got {tuple(getattr(mask, 'shape', ()))}")
        return masks

    def _check_input(self, x):
        if not isinstance(x, dict):
            raise TypeError(f"input must be a dict (OrderedDict) of stage maps, finest first, got {type(x).__name__}")
        names = list(x.keys())
        if len(names) != len(self.in_channels_list):
            raise ValueError(f"input has {len(names)} stage maps ({names}) but in_channels_list has {len(self.in_channels_list)} entries")
        previous_size, first = None, None
        for name, expected in zip(names, self.in_channels_list):
            t = x[name]
            if isinstance(t, torch.fx.Proxy):  # FX symbolic tracing: no shapes to check until it runs
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"stage {name!r} must be a 4-D NCHW tensor, got {getattr(t, 'shape', type(t).__name__)}")
            if t.shape[1] != expected:
                raise ValueError(f"stage {name!r} has {t.shape[1]} channels but in_channels_list says {expected}")
            if first is None:
                first = name
            elif t.shape[0] != x[first].shape[0]:  # said here: the kernels would name their own arguments
                raise ValueError(f"stage maps must share the batch size: stage {name!r} has {t.shape[0]} images, "
                                 f"stage {first!r} {x[first].shape[0]}")
            size = tuple(t.shape[-2:])
            if previous_size is not None and (size[0] > previous_size[0] or size[1] > previous_size[1]):
                raise ValueError(f"stage maps must be ordered finest first: stage {name!r} is {size[0]}x{size[1]}, larger than the stage before it ({previous_size[0]}x{previous_size[1]})")
            previous_size = size
        return names


def _budget_count(fraction, positions):
    """(1, 1) long tensor: round(fraction * positions), at least 1 (a mask is never empty)."""
    return (fraction.detach() * positions).round().long().clamp(1, positions).view(1, 1)


def budget_threshold(logits, fraction):
    """(N, 1, 1, 1), detached: per image, a value between its k-th and (k+1)-th highest logit,
    k = round(fraction * H * W), so ``logits - threshold > 0`` keeps exactly the top k (below
    the lowest logit when k is every position). Tensor ops only: no graph break under compile."""
    flat = logits.detach().flatten(1)
    positions = flat.shape[1]
    k = _budget_count(fraction, positions).expand(flat.shape[0], 1)
    values = flat.sort(dim=1, descending=True).values
    kth = values.gather(1, k - 1)
    following = values.gather(1, k.clamp(max=positions - 1))
    threshold = torch.where(k < positions, (kth + following) / 2, kth - 1)
    return threshold.view(-1, 1, 1, 1)


def top_fraction_mask(logits, fraction):
    """{0, 1} mask of ``logits``' shape, exactly the k = round(fraction * H * W) highest logits
    of each image (at least 1), ties broken by position (a stable sort), so constant regions
    still give k positions."""
    flat = logits.detach().flatten(1)
    positions = flat.shape[1]
    order = flat.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(positions, device=flat.device).expand_as(order))
    return (ranks < _budget_count(fraction, positions)).to(logits.dtype).view_as(logits)


def pooled_lateral(conv, stage, weights):
    """sum over positions p of weights(p) * conv(stage)(p), for a 1x1 conv, without computing
    conv(stage): conv.weight @ (sum_p weights(p) stage(p)) + conv.bias * sum_p weights(p)."""
    weighted_sum = torch.bmm(stage.flatten(2), weights.flatten(2).transpose(1, 2)).squeeze(2)
    out = torch.nn.functional.linear(weighted_sum, conv.weight.flatten(1))
    return out + weights.sum(dim=(1, 2, 3))[:, None] * conv.bias


def footprint_counts(size, finer_sizes):
    """(h, w) map: how many positions of the last of finer_sizes each position of a (h, w) map
    reaches through successive nearest upsamplings (F.interpolate's rule) to each size. The
    rule is separable, so per axis: a 1-D nearest upsampling of the source indices, counted
    with index_add (a static output shape, unlike bincount: no graph break under compile)."""
    counts = []
    for axis in range(2):
        index = torch.arange(size[axis], dtype=torch.float64).view(1, 1, -1)
        for finer in finer_sizes:
            index = torch.nn.functional.interpolate(index, size=int(finer[axis]), mode="nearest")
        index = index.flatten().long()
        counts.append(torch.zeros(size[axis], dtype=torch.float64).index_add_(0, index, torch.ones_like(index, dtype=torch.float64)))
    return counts[0][:, None] * counts[1][None, :]


def _ordered(by_name, names):
    return OrderedDict((name, by_name[name]) for name in names)
