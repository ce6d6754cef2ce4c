"""Detectors composed from torchvision parts, never copied.

`build_detector` assembles a ResNet body, an FPN of configurable width exposing the levels the
distillers need (P2..P6 for Faster R-CNN, P3..P7 for RetinaNet), small-object anchors and the
input size, and hands them to torchvision's own `FasterRCNN` / `RetinaNet` constructors. The
distillers then read features through hooks, so any detector built here (or any other
torchvision-style one) plugs in unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from hmkd_core.spec import ModelSpec, coco_weights_refusal

log = logging.getLogger(__name__)

_RESNETS: dict[str, tuple[Callable[..., resnet.ResNet], Any]] = {
    "resnet18": (resnet.resnet18, resnet.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (resnet.resnet34, resnet.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (resnet.resnet50, resnet.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (resnet.resnet101, resnet.ResNet101_Weights.IMAGENET1K_V1),
}
_DEFAULT_ANCHORS = [16, 32, 64, 128, 256]


class WeightsError(RuntimeError):
    """Weights that cannot be had: no network for a download, or an unusable file."""


def resolve_norm(spec: ModelSpec, saved: dict[str, Any] | None = None) -> str:
    """`auto`: frozen BN over downloaded weights, GroupNorm from scratch, and for a file the
    norm it was trained with (an exported student records it)."""
    if spec.backbone_norm != "auto":
        return spec.backbone_norm
    if saved is not None:
        # an exported student keeps its ModelSpec under "model"; a checkpoint under "spec"
        described = (
            saved["model"] if "state_dict" in saved else saved.get("spec", {}).get("student")
        )
        norm = (described or {}).get("backbone_norm", "auto")
        if norm != "auto":
            return str(norm)
        return "frozen_bn" if (described or {}).get("weights") in ("imagenet", "coco") else "gn"
    return "frozen_bn" if spec.weights in ("imagenet", "coco") else "gn"


def _norm_layer(kind: str) -> Callable[[int], nn.Module]:
    if kind == "frozen_bn":
        return FrozenBatchNorm2d
    if kind == "bn":
        return nn.BatchNorm2d
    return partial(_group_norm)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4), channels)


def _download_guard(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise WeightsError(
            f"could not download {what} ({err}). This machine may have no network: download "
            "the weights where there is one and pass their path as `weights`, or use "
            "`weights: none`."
        ) from err


def build_backbone(spec: ModelSpec) -> BackboneWithFPN:
    """ResNet body + FPN. Faster R-CNN gets P2..P6, RetinaNet P3..P7 (its usual pyramid)."""
    ctor, imagenet = _RESNETS[spec.backbone]
    weights = imagenet if spec.weights == "imagenet" else None
    body = (
        _download_guard(f"ImageNet weights for {spec.backbone}", lambda: ctor(weights=weights))
        if weights is not None
        else None
    )
    norm = _norm_layer(resolve_norm(spec))
    fresh = ctor(weights=None, norm_layer=norm)
    if body is not None:
        fresh.load_state_dict(body.state_dict(), strict=False)
    body = fresh
    # Freeze the first (5 - trainable) stages, as torchvision's builders do.
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][: spec.trainable_backbone_layers]
    if spec.trainable_backbone_layers == 5:
        stages.append("bn1")
    for name, p in body.named_parameters():
        if not any(name.startswith(s) for s in stages):
            p.requires_grad_(False)

    c = 512 if spec.backbone in ("resnet18", "resnet34") else 2048
    if spec.arch == "faster_rcnn":
        returned, extra = [1, 2, 3, 4], LastLevelMaxPool()
    else:
        returned, extra = [2, 3, 4], LastLevelP6P7(spec.fpn_channels, spec.fpn_channels)
    return BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(i) for i, k in enumerate(returned)},
        in_channels_list=[c // 8 * 2 ** (k - 1) for k in returned],
        out_channels=spec.fpn_channels,
        extra_blocks=extra,
    )


def build_detector(spec: ModelSpec, num_classes: int) -> nn.Module:
    """A torchvision detector per `spec`; `num_classes` includes the background class.

    Weights named by path are loaded here too, so a teacher trained by this library is
    rebuilt with one call. `coco` replaces the whole detector's weights but the box predictor,
    whose classes differ.
    """
    if spec.weights == "coco":
        return _coco_detector(spec, num_classes)
    saved = None
    if spec.weights not in ("none", "imagenet"):
        saved = read_weights_file(Path(spec.weights))
        spec = spec.model_copy(update={"backbone_norm": resolve_norm(spec, saved)})
    backbone = build_backbone(spec)
    sizes = spec.anchor_sizes or _DEFAULT_ANCHORS
    common = dict(
        min_size=spec.min_size,
        max_size=spec.max_size,
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
    )
    if spec.arch == "faster_rcnn":
        anchors = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes))
        model: nn.Module = FasterRCNN(
            backbone,
            num_classes=num_classes,
            rpn_anchor_generator=anchors,
            rpn_post_nms_top_n_train=spec.rpn_post_nms_top_n_train,
            box_batch_size_per_image=spec.box_batch_size_per_image,
            **common,
        )
    else:
        octave = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes)
        anchors = AnchorGenerator(octave, ((0.5, 1.0, 2.0),) * len(sizes))
        model = RetinaNet(backbone, num_classes=num_classes, anchor_generator=anchors, **common)
    if saved is not None:
        load_state(model, saved, Path(spec.weights))
    return model


def _coco_detector(spec: ModelSpec, num_classes: int) -> nn.Module:
    from torchvision.models.detection import faster_rcnn, retinanet

    if why := coco_weights_refusal(spec.backbone):  # refused by ModelSpec; built otherwise
        raise WeightsError(why)
    model = build_detector(spec.model_copy(update={"weights": "none"}), num_classes)
    if spec.arch == "faster_rcnn":
        w = faster_rcnn.FasterRCNN_ResNet50_FPN_Weights.COCO_V1
    else:
        w = retinanet.RetinaNet_ResNet50_FPN_Weights.COCO_V1
    state = _download_guard("COCO detector weights", lambda: w.get_state_dict(progress=False))
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    log.info(
        "loaded %d/%d COCO tensors (heads sized for other classes skipped)", len(usable), len(own)
    )
    return model


def read_weights_file(path: Path) -> dict[str, Any]:
    """A `student.pt` or training checkpoint written by this library, read as data only."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path}: not a readable weights file ({err})") from err
    if not isinstance(blob, dict) or not isinstance(
        blob.get("state_dict", blob.get("model")), dict
    ):
        raise WeightsError(f"{path}: holds no 'state_dict' or 'model' entry")
    return blob


def load_state(model: nn.Module, blob: dict[str, Any], path: Path) -> None:
    state = blob["state_dict"] if "state_dict" in blob else blob["model"]
    own = model.state_dict()
    misshapen = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or misshapen:
        raise WeightsError(
            f"{path}: does not match the model described by the spec "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shape {misshapen[:3]}); "
            "check arch, backbone, "
            "fpn_channels, backbone_norm and the number of classes"
        )
    model.load_state_dict(state)
