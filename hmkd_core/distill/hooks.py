"""Capture a detector's intermediate tensors with forward hooks instead of editing it.

A torchvision detector's `transform` returns the resized, normalised, padded batch (an
`ImageList`) and the boxes mapped onto it; its `backbone` returns the FPN dict. Recording both
lets one student forward serve the detection losses and the distillation losses, and lets the
frozen teacher run its backbone on exactly the tensor the student saw. The recorder keeps its
hook handles and removes them in `close()`, so nothing lingers on the model.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Self

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def name_levels(features: dict[str, Tensor], input_hw: tuple[int, int]) -> dict[str, Tensor]:
    """Name FPN outputs by stride (`p2` = stride 4), whatever keys the backbone used.

    Features are (B, C, H_l, W_l) maps of a padded (B, 3, H, W) batch, finest first, each level
    half the previous one. The finest level's stride is read off its size; the coarse levels of
    a small input can shrink to 1x1, so their names follow from their order instead.
    """
    named: dict[str, Tensor] = OrderedDict()
    first = None
    for i, (key, feat) in enumerate(features.items()):
        if first is None:
            stride = input_hw[0] / feat.shape[-2]
            first = round(math.log2(stride))
            if abs(2**first - stride) > 1e-6 * stride:
                raise ValueError(f"feature {key!r} has stride {stride:.3f}, not a power of two")
        named[f"p{first + i}"] = feat
    return named


class _Recorder:
    """Hook handles and their lifecycle, shared by the recorders: `close()` removes every hook
    and forgets what was recorded; a recorder is also a context manager that closes on exit."""

    _handles: list[RemovableHandle]

    def reset(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Remove the hooks: nothing lingers on the detector."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.reset()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FeatureRecorder(_Recorder):
    """Records `transform` and `backbone` outputs of a torchvision-style detector."""

    def __init__(self, detector: nn.Module) -> None:
        det = unwrap(detector)
        for part in ("transform", "backbone"):
            if not isinstance(getattr(det, part, None), nn.Module):
                raise TypeError(
                    f"{type(det).__name__} has no `{part}` module; distillation needs a "
                    "torchvision-style detector (transform + backbone)"
                )
        self.images: Any = None
        self.targets: list[dict[str, Tensor]] | None = None
        self.features: dict[str, Tensor] | None = None
        self._handles: list[RemovableHandle] = [
            det.transform.register_forward_hook(self._on_transform),
            det.backbone.register_forward_hook(self._on_backbone),
        ]

    def _on_transform(self, module: nn.Module, args: Any, output: Any) -> None:
        self.images, self.targets = output

    def _on_backbone(self, module: nn.Module, args: Any, output: Any) -> None:
        self.features = output

    def levels(self) -> dict[str, Tensor]:
        if self.images is None or self.features is None:
            raise RuntimeError("no forward pass recorded yet")
        return name_levels(self.features, tuple(self.images.tensors.shape[-2:]))

    def reset(self) -> None:
        self.images = self.targets = self.features = None


class BoxHeadRecorder(_Recorder):
    """Records what a Faster R-CNN's box head saw in its last forward: the RoIs it pooled
    (per image, in batch-tensor pixels, with the image sizes) and the class scores and box
    deltas it gave them.

    In training these are the RoIs `roi_heads` sampled for its loss, so a teacher's box head run
    on them answers exactly what the student's was trained on in the same step.
    """

    def __init__(self, detector: nn.Module) -> None:
        heads = getattr(unwrap(detector), "roi_heads", None)
        parts = ("box_roi_pool", "box_predictor")
        if heads is None or not all(isinstance(getattr(heads, p, None), nn.Module) for p in parts):
            raise TypeError(
                f"{type(unwrap(detector)).__name__} has no Faster R-CNN box head (roi_heads with "
                "box_roi_pool and box_predictor); response distillation needs one"
            )
        self.proposals: list[Tensor] | None = None
        self.image_shapes: list[tuple[int, int]] | None = None
        self.class_logits: Tensor | None = None
        self.box_deltas: Tensor | None = None
        self._handles: list[RemovableHandle] = [
            heads.box_roi_pool.register_forward_hook(self._on_pool),
            heads.box_predictor.register_forward_hook(self._on_predictor),
        ]

    # Only training forwards are kept: an evaluation's detections are not what the loss is on,
    # and holding them would keep a batch of tensors alive until the next training step.
    def _on_pool(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training:
            _, self.proposals, self.image_shapes = args

    def _on_predictor(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training:
            self.class_logits, self.box_deltas = output

    def recorded(self) -> tuple[list[Tensor], list[tuple[int, int]], Tensor, Tensor]:
        """(RoIs per image, image sizes, class logits, box deltas) of the last training
        forward."""
        if (
            self.proposals is None
            or self.image_shapes is None
            or self.class_logits is None
            or self.box_deltas is None
        ):
            raise RuntimeError("no box head forward recorded yet")
        return self.proposals, self.image_shapes, self.class_logits, self.box_deltas

    def reset(self) -> None:
        """Forget the last forward, so a stale one is never read for the next batch."""
        self.proposals = self.image_shapes = self.class_logits = self.box_deltas = None


class ObjectnessRecorder(_Recorder):
    """Records the objectness logits a Faster R-CNN's RPN head gave every anchor in its last
    training forward (one (B, A, H, W) map per level)."""

    def __init__(self, detector: nn.Module) -> None:
        rpn = getattr(unwrap(detector), "rpn", None)
        if rpn is None or not isinstance(getattr(rpn, "head", None), nn.Module):
            raise TypeError(
                f"{type(unwrap(detector)).__name__} has no region proposal network (rpn.head); "
                "objectness distillation needs one"
            )
        self.objectness: list[Tensor] | None = None
        self._handles: list[RemovableHandle] = [rpn.head.register_forward_hook(self._on_head)]

    def _on_head(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training:
            self.objectness = list(output[0])

    def recorded(self) -> list[Tensor]:
        if self.objectness is None:
            raise RuntimeError("no RPN forward recorded yet")
        return self.objectness

    def reset(self) -> None:
        self.objectness = None
