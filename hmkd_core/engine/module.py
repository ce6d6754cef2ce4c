"""The training module: student forward + frozen teacher + distiller, one call, named losses.

Wrapping the three in one `nn.Module` lets DDP see every trainable parameter (student and
distiller) while the teacher stays outside it: unregistered, in eval mode, under no_grad, so
neither `train()`, `state_dict()` nor DDP's gradient sync can touch it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hmkd_core.distill.base import Distiller, DistillInputs
from hmkd_core.distill.hooks import (
    BoxHeadRecorder,
    FeatureRecorder,
    ObjectnessRecorder,
    name_levels,
    unwrap,
)
from hmkd_core.distill.response import HeadOutputs, ResponseDistiller, RoITargets, match_rois
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
    def heads(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        objectness: bool = False,
    ) -> HeadOutputs:
        """The teacher box head's class scores and deltas for given RoIs, and (if asked) its
        RPN's objectness of every anchor, on the teacher's own features."""
        heads = self.detector.roi_heads
        pooled = heads.box_roi_pool(features, proposals, image_shapes)
        logits, deltas = heads.box_predictor(heads.box_head(pooled))
        scores = self.detector.rpn.head(list(features.values()))[0] if objectness else None
        return HeadOutputs(logits, deltas, scores)


class ResponseTerms:
    """The response distiller with what it reads: hooks on the student's box head (and RPN
    head, when objectness is distilled), the teacher's heads run on the same RoIs, and the RoIs'
    classes as the student's `roi_heads` assigned them. One place for the trainer and the
    probe. `close()` removes the hooks."""

    def __init__(self, student: nn.Module, distiller: ResponseDistiller) -> None:
        self.distiller = distiller
        self._box = BoxHeadRecorder(student)  # refuses a detector without a box head
        self._rpn = ObjectnessRecorder(student) if distiller.needs_objectness else None
        det = unwrap(student)
        self._heads = det.roi_heads
        self._rpn_samples = int(det.rpn.fg_bg_sampler.batch_size_per_image)

    def losses(
        self,
        teacher: FrozenTeacher,
        teacher_features: dict[str, Tensor],
        targets: list[dict[str, Tensor]],
        detach_student: bool = False,
    ) -> dict[str, Tensor]:
        """The distiller's losses for the student's last training forward; `targets` are the
        transformed ones that forward trained on. Forgets that forward."""
        targets = [{k: v.detach() for k, v in t.items()} for t in targets]
        proposals, shapes, logits, deltas = self._box.recorded()
        objectness = self._rpn.recorded() if self._rpn is not None else None
        if detach_student:
            logits, deltas = logits.detach(), deltas.detach()
            objectness = [o.detach() for o in objectness] if objectness is not None else None
        labels = gt_deltas = None
        if self.distiller.needs_roi_targets:
            labels, gt_deltas = match_rois(
                [p.detach() for p in proposals],
                targets,
                float(self._heads.proposal_matcher.high_threshold),
                self._heads.box_coder,
            )
        rois = RoITargets(labels, gt_deltas, float(self._rpn_samples * len(proposals)))
        theirs = teacher.heads(teacher_features, proposals, shapes, objectness is not None)
        losses = self.distiller(HeadOutputs(logits, deltas, objectness), theirs, rois)
        self.reset()
        return losses

    def reset(self) -> None:
        self._box.reset()
        if self._rpn is not None:
            self._rpn.reset()

    def close(self) -> None:
        self._box.close()
        if self._rpn is not None:
            self._rpn.close()


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
        self._distil_features = has_features
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never trained or synced
        self._recorder = FeatureRecorder(student) if teacher is not None else None
        self._response = ResponseTerms(student, response) if response is not None else None
        # while set, the distillation losses reach the distiller only (`distill.align_iters`)
        self.detach_student = False

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        losses = {f"student.{k}": v for k, v in self.student(images, targets).items()}
        features = self._distil_features
        responses = self._response is not None
        if self._recorder is None or self.teacher is None or not (features or responses):
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
        if self._response is not None:
            terms = self._response.losses(self.teacher, teacher, rec.targets, self.detach_student)
            for k, v in terms.items():
                losses[f"distill.{k}"] = v
        rec.reset()
        return losses
