"""Feature distillers for torchvision-style detectors: HMKD and the baselines it is compared to.

Each distiller maps `DistillInputs` (student/teacher FPN features and ground-truth boxes) to a
dict of weighted `loss_*` tensors that the trainer sums. `build_distiller` picks one by name.
`ResponseDistiller` adds class-score distillation on the student's RoIs beside any of them.
"""

from hmkd_core.distill.attention import WindowCrossAttention, window_attention
from hmkd_core.distill.base import (
    Distiller,
    DistillInputs,
    NoDistiller,
    build_aligners,
    check_inputs,
    level_stride,
)
from hmkd_core.distill.fgd import FGDDistiller, GcBlock, global_relation_loss
from hmkd_core.distill.focal import focal_feature_loss
from hmkd_core.distill.hm import HierarchicalMatching, hm_weights, weighted_mse
from hmkd_core.distill.hmkd import HMKDDistiller
from hmkd_core.distill.masks import (
    batch_masks,
    channel_attention,
    level_masks,
    scale_aware_mask,
    spatial_attention,
)
from hmkd_core.distill.mgd import MGDDistiller, random_spatial_mask
from hmkd_core.distill.mimic import MimicDistiller
from hmkd_core.distill.registry import DISTILLERS, build_distiller, build_response
from hmkd_core.distill.response import ResponseDistiller, class_score_kd

__all__ = [
    "DISTILLERS",
    "DistillInputs",
    "Distiller",
    "FGDDistiller",
    "GcBlock",
    "HMKDDistiller",
    "HierarchicalMatching",
    "MGDDistiller",
    "MimicDistiller",
    "NoDistiller",
    "ResponseDistiller",
    "WindowCrossAttention",
    "batch_masks",
    "build_aligners",
    "build_distiller",
    "build_response",
    "channel_attention",
    "check_inputs",
    "class_score_kd",
    "focal_feature_loss",
    "global_relation_loss",
    "hm_weights",
    "level_masks",
    "level_stride",
    "random_spatial_mask",
    "scale_aware_mask",
    "spatial_attention",
    "weighted_mse",
    "window_attention",
]
