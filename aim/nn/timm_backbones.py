"""timm models (``timm:NAME``) as AIM backbones: the stage maps of timm's own feature API, their
channels and strides read from the model's ``feature_info``; plain ViTs, whose blocks all keep
one stride, through ViTDet's simple feature pyramid. timm is optional: ``pip install .[timm]``."""
from torch import nn

from aim.errors import UsageError

TIMM_PREFIX = "timm:"
# The paper's stages S_0..S_3 have strides 4..32; a stride-2 stem map (timm's ResNets list one)
# is left out, as the torchvision ResNet adapter leaves it out.
FINEST_STRIDE = 4
PYRAMID_LEVELS = 4  # ViTDet's strides s/4, s/2, s, 2s


def check_pyramid_levels(levels):
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= PYRAMID_LEVELS:
        raise ValueError(f"pyramid_levels must be an int in 1..{PYRAMID_LEVELS}, got {levels!r}")


def import_timm():
    try:
        import timm
    except ImportError:
        raise UsageError("timm:NAME backbones need timm, an optional dependency: pip install .[timm]") from None
    return timm


def is_timm_name(name):
    return isinstance(name, str) and name.startswith(TIMM_PREFIX)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al., ECCV 2022) over a plain ViT's maps of stride s
    and C channels: stride s/4 by two 2x2 deconvolutions (LayerNorm and GELU between), s/2 by
    one, s as it is, 2s by 2x2 max pooling; C/4, C/2, C and C channels, as in ViTDet (its
    projections to a common width are the top-down pathway's lateral convolutions here).

    ``levels``: how many of these four, coarsest kept, are built (the pathway of AIM[depth]
    reads the ``depth`` coarsest stages: finer levels would be computed for nothing).
    ``forward`` takes one map per built level, finest first (the same map each time, as in
    ViTDet, or the outputs of chosen blocks) and returns a dict keyed by the level's place
    among the four ("0" finest), so stage names do not depend on ``levels``."""

    def __init__(self, channels, levels=4):
        super().__init__()
        from timm.layers import LayerNorm2d

        check_pyramid_levels(levels)
        every_level = {
            "0": lambda: nn.Sequential(nn.ConvTranspose2d(channels, channels // 2, 2, stride=2), LayerNorm2d(channels // 2),
                                       nn.GELU(), nn.ConvTranspose2d(channels // 2, channels // 4, 2, stride=2)),
            "1": lambda: nn.ConvTranspose2d(channels, channels // 2, 2, stride=2),
            "2": nn.Identity,
            "3": lambda: nn.MaxPool2d(2, stride=2),
        }
        self.levels = nn.ModuleDict({name: build() for name, build in list(every_level.items())[4 - levels:]})
        self.channels = [channels // 4, channels // 2, channels, channels][4 - levels:]
        self.stride_factors = [1 / 4, 1 / 2, 1, 2][4 - levels:]

    def forward(self, maps):
        return {name: level(x) for (name, level), x in zip(self.levels.items(), maps)}


class TimmBackbone(nn.Module):
    """A timm model's stage maps, NCHW, finest first, one per stride (the deepest feature at that
    stride, strides from 4 up), through ``forward_intermediates(..., intermediates_only=True)``
    or, for a model without it, timm's ``features_only`` wrapper (NHWC outputs permuted).

    A model whose features all share one stride (a plain ViT) gets a :class:`SimpleFeaturePyramid`
    of ``pyramid_levels`` levels over the output of its last block, or over ``pyramid_blocks``
    (four block indices, one per level of the full pyramid, finest first). Its class and other
    prefix tokens stay out of the maps. Other models ignore both arguments.

    Attributes: ``model`` (the timm model, its classifier head, its final norm and any unused
    blocks pruned), ``stage_channels`` and ``stage_strides`` (from ``feature_info``; the pyramid's
    for a plain ViT), ``stage_names`` (the keys of the returned dict: "0", "1", ... by position;
    a pyramid level's place among the four), ``classifier_only_keys`` (the entries of the full classifier's state dict
    that ``model`` does not have), ``model_key_of`` (this module's name of each other entry),
    ``last_stage`` (GradCAM's layer).
    """

    def __init__(self, classifier, pyramid_levels=4, pyramid_blocks=None, features_only_model=None):
        super().__init__()
        feature_info = classifier.feature_info
        self.take, self.level_inputs = self.stage_indices(feature_info, pyramid_levels, pyramid_blocks)
        if self.level_inputs is not None:
            self.pyramid = SimpleFeaturePyramid(feature_info[self.take[-1]]["num_chs"], pyramid_levels)
            self.stage_channels = self.pyramid.channels
            self.stage_names = list(self.pyramid.levels)
            strides = [feature_info[0]["reduction"] * f for f in self.pyramid.stride_factors]
            self.stage_strides = [int(s) if s == int(s) else s for s in strides]  # s/4 of a patch-14 ViT is 3.5
        else:
            self.pyramid = None
            self.stage_channels = [feature_info[i]["num_chs"] for i in self.take]
            self.stage_strides = [feature_info[i]["reduction"] for i in self.take]
            self.stage_names = [str(i) for i in range(len(self.take))]
        classifier_keys = list(classifier.state_dict())
        self.features_only = features_only_model is not None
        if self.features_only:
            self.model = features_only_model
            self.outputs_nhwc = features_only_model.output_fmt == "NHWC"
        else:
            classifier.prune_intermediate_layers(self.take, prune_norm=True, prune_head=True)
            self.model = classifier
            self.outputs_nhwc = False  # forward_intermediates gives NCHW (its default output_fmt)
        # timm's features_only wrapper names a module "a.b" of the classifier "a_b" (flatten_sequential).
        model_keys = set(self.model.state_dict())
        renamed = {k: next((m for m in (k, k.replace(".", "_", 1)) if m in model_keys), None) for k in classifier_keys}
        self.model_key_of = {k: f"model.{m}" for k, m in renamed.items() if m is not None}
        self.classifier_only_keys = frozenset(k for k, m in renamed.items() if m is None)
        # The coarsest map as the pathway receives it (NCHW): the layer GradCAM hooks.
        self.last_stage = nn.Identity()

    @staticmethod
    def stage_indices(feature_info, pyramid_levels=4, pyramid_blocks=None):
        """(indices into ``feature_info`` of the features to compute; for a plain ViT the
        position among them of each built pyramid level's input, else None)."""
        strides = [info["reduction"] for info in feature_info]
        if len(set(strides)) > 1:
            # Per stride its deepest feature: timm lists a stage's blocks in order.
            deepest = {stride: i for i, stride in enumerate(strides) if stride >= FINEST_STRIDE}
            return sorted(deepest.values()), None
        check_pyramid_levels(pyramid_levels)
        blocks = [len(strides) - 1] * 4 if pyramid_blocks is None else list(pyramid_blocks)
        if len(blocks) != 4 or not all(isinstance(b, int) and -len(strides) <= b < len(strides) for b in blocks):
            raise ValueError(f"pyramid_blocks must be 4 indices among the model's {len(strides)} blocks, got {pyramid_blocks!r}")
        blocks = [b % len(strides) for b in blocks][4 - pyramid_levels:]
        take = sorted(set(blocks))
        return take, [take.index(b) for b in blocks]

    def forward(self, images):
        if self.features_only:
            maps = self.model(images)
            if self.outputs_nhwc:
                maps = [m.permute(0, 3, 1, 2) for m in maps]
        else:
            maps = self.model.forward_intermediates(images, indices=self.take, intermediates_only=True)
        stages = self.pyramid([maps[i] for i in self.level_inputs]) if self.pyramid is not None else dict(zip(self.stage_names, maps))
        coarsest = self.stage_names[-1]
        stages[coarsest] = self.last_stage(stages[coarsest])
        return stages

    def backbone_state_of_classifier(self, state):
        """A timm classifier's state dict (of this architecture) under this module's names,
        without the entries of the parts pruned away; keys this architecture does not have stay
        as they are, for the loader to name."""
        return {self.model_key_of.get(k, k): v for k, v in state.items() if k not in self.classifier_only_keys}

    @property
    def new_parameter_prefixes(self):
        """Layers a classifier's state dict cannot hold: the pyramid is AIM's, like the pathway."""
        return ("pyramid.",) if self.pyramid is not None else ()


def create_timm_classifier(name, pretrained=False, image_size=None, **model_kwargs):
    """``timm.create_model(name, pretrained=pretrained, **model_kwargs)``; a model bound to one
    input size (timm's ``fixed_input_size``: ViT, Swin) is built for ``image_size`` unless
    ``img_size`` is among the kwargs (timm resamples pretrained position embeddings to it).
    ``pretrained=True`` loads timm's weights from the Hugging Face hub (timm's own code, needs
    network)."""
    timm = import_timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5] if name else []
        raise UsageError(f"timm has no model {name!r}" + (f" (similar: {', '.join(close)})" if close else "")
                         + "; timm.list_models() lists them")
    config = timm.get_pretrained_cfg(name)
    if image_size is not None and config is not None and config.fixed_input_size and "img_size" not in model_kwargs:
        model_kwargs["img_size"] = image_size
    return timm.create_model(name, pretrained=pretrained, **model_kwargs)


def build_timm_backbone(name, pretrained=False, image_size=None, pyramid_levels=PYRAMID_LEVELS, pyramid_blocks=None,
                        **model_kwargs):
    """:class:`TimmBackbone` of :func:`create_timm_classifier` (``pyramid_levels`` and
    ``pyramid_blocks``: a plain ViT's pyramid, see there)."""
    classifier = create_timm_classifier(name, pretrained, image_size, **model_kwargs)
    if not getattr(classifier, "feature_info", None):
        raise UsageError(f"timm:{name} declares no feature_info: timm gives no stage maps for it")
    features_only_model = None
    if not hasattr(classifier, "forward_intermediates"):
        # timm's wrapper for such a model is built by create_model itself (per-model settings);
        # the classifier is kept for its feature_info and its state dict's keys.
        take, _ = TimmBackbone.stage_indices(classifier.feature_info, pyramid_levels, pyramid_blocks)
        features_only_model = create_timm_classifier(name, pretrained, image_size, features_only=True, out_indices=take,
                                                     **model_kwargs)
    return TimmBackbone(classifier, pyramid_levels, pyramid_blocks, features_only_model)
