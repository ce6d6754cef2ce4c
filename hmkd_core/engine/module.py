"""The training module: student forward + frozen teacher + distiller, one call, named losses.

Wrapping the three in one `nn.Module` lets DDP see every trainable parameter (student and
distiller) while the teacher stays outside it: unregistered, in eval mode, under no_grad, so
neither `train()`, `state_dict()` nor DDP's gradient sync can touch it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hmkd_core.distill.base import Distiller, DistillInputs
from hmkd_core.distill.hooks import BoxHeadRecorder, FeatureRecorder, name_levels
from hmkd_core.distill.response import ResponseDistiller
from hmkd_core.spec import PYRAMIDS, ModelSpec


class IncompatiblePairError(ValueError):
    """Teacher and student that cannot share one batch tensor or one set of levels."""


def check_pair(student: ModelSpec, teacher: ModelSpec, levels: tuple[str, ...]) -> None:
    """Refuse at build time what would silently distil garbage at run time.

    The teacher runs on the student's transformed batch, so both must normalise and resize
    identically; and both pyramids must contain every distilled level.
    """
    for name in ("image_mean", "image_std", "min_size", "max_size"):
        s, t = getattr(student, name), getattr(teacher, name)
        if s != t:
            raise IncompatiblePairError(
                f"student.{name} ({s}) differs from teacher.{name} ({t}): the teacher runs on "
                "the student's transformed batch, so set both the same"
            )
    for role, spec in (("student", student), ("teacher", teacher)):
        have = PYRAMIDS[spec.arch]
        missing = [lv for lv in levels if lv not in have]
        if missing:
            raise IncompatiblePairError(
                f"{role} ({spec.arch}) has no level(s) {missing}; it has {list(have)}"
            )


class FrozenTeacher:
    """A teacher detector pinned in eval mode; only its backbone runs, on a given batch."""

    def __init__(self, detector: nn.Module) -> None:
        self.detector = detector.eval()
        for p in self.detector.parameters():
            p.requires_grad_(False)

    @property
    def out_channels(self) -> int:
        return int(self.detector.backbone.out_channels)

    def to(self, device: torch.device) -> FrozenTeacher:
        self.detector.to(device)
        return self

    @torch.no_grad()
    def backbone(self, batch: Tensor) -> dict[str, Tensor]:
        """The FPN outputs under the backbone's own keys (what its box head pools from)."""
        self.detector.eval()
        return self.detector.backbone(batch)

    def features(self, batch: Tensor) -> dict[str, Tensor]:
        return name_levels(self.backbone(batch), tuple(batch.shape[-2:]))

    @torch.no_grad()
    def box_scores(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        """The teacher box head's class scores for given RoIs, on the teacher's own features."""
        heads = self.detector.roi_heads
        pooled = heads.box_roi_pool(features, proposals, image_shapes)
        return heads.box_predictor(heads.box_head(pooled))[0]


class TrainModule(nn.Module):
    """Returns `student.loss_*` and `distill.loss_*` entries; the trainer sums them."""

    def __init__(
        self,
        student: nn.Module,
        distiller: Distiller | None = None,
        teacher: FrozenTeacher | None = None,
        response: ResponseDistiller | None = None,
    ) -> None:
        super().__init__()
        has_features = distiller is not None and bool(distiller.levels)
        if (has_features or response is not None) and teacher is None:
            raise ValueError("a distiller needs a teacher")
        self.student = student
        self.distiller = distiller
        self.response = response
        self._distil_features = has_features
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never trained or synced
        self._recorder = FeatureRecorder(student) if teacher is not None else None
        self._box_head = BoxHeadRecorder(student) if response is not None else None
        # while set, the distillation losses reach the distiller only (`distill.align_iters`)
        self.detach_student = False

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        losses = {f"student.{k}": v for k, v in self.student(images, targets).items()}
        features = self._distil_features
        class_scores = self._box_head is not None
        if self._recorder is None or self.teacher is None or not (features or class_scores):
            return losses
        rec = self._recorder
        batch = rec.images.tensors
        teacher = self.teacher.backbone(batch.detach())
        if features:
            assert self.distiller is not None
            student = rec.levels()
            if self.detach_student:
                student = {name: f.detach() for name, f in student.items()}
            inputs = DistillInputs(
                student=student,
                teacher=name_levels(teacher, tuple(batch.shape[-2:])),
                boxes=[t["boxes"].detach() for t in rec.targets],
                image_size=(int(batch.shape[-2]), int(batch.shape[-1])),
            )
            for k, v in self.distiller(inputs).items():
                losses[f"distill.{k}"] = v
        if self._box_head is not None:
            assert self.response is not None
            proposals, shapes, logits = self._box_head.recorded()
            if self.detach_student:
                logits = logits.detach()
            teacher_scores = self.teacher.box_scores(teacher, proposals, shapes)
            for k, v in self.response(logits, teacher_scores).items():
                losses[f"distill.{k}"] = v
            self._box_head.reset()
        rec.reset()
        return losses
