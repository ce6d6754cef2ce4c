"""The training module: student forward + frozen teacher + distiller, one call, named losses.

Wrapping the three in one `nn.Module` lets DDP see every trainable parameter (student and
distiller) while the teacher stays outside it: unregistered, in eval mode, under no_grad, so
neither `train()`, `state_dict()` nor DDP's gradient sync can touch it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
from hmkd_core.spec import PYRAMIDS, ModelSpec, teacher_input_scale


class IncompatiblePairError(ValueError):
    """Teacher and student whose inputs or levels cannot be aligned."""


def check_pair(student: ModelSpec, teacher: ModelSpec, levels: tuple[str, ...]) -> int:
    """Refuse at build time what would silently distil garbage at run time; return how many
    times the student's input size the teacher reads (`teacher_input_scale`).

    The same rules as the spec's own check, for a pair built without a `TrainSpec`.
    """
    try:
        scale = teacher_input_scale(student, teacher)
    except ValueError as err:
        raise IncompatiblePairError(str(err)) from None
    for role, spec in (("student", student), ("teacher", teacher)):
        have = PYRAMIDS[spec.arch]
        missing = [lv for lv in levels if lv not in have]
        if missing:
            raise IncompatiblePairError(
                f"{role} ({spec.arch}) has no level(s) {missing}; it has {list(have)}"
            )
    return scale


@dataclass(frozen=True)
class TeacherView:
    """What the teacher saw of one batch.

    `raw`: its FPN outputs under the backbone's own keys at its own resolution, what its box
    head pools from. `levels`: the same maps named by level (`p2`...) on the student's grid,
    what feature distillers compare with the student's.
    """

    raw: dict[str, Tensor]
    levels: dict[str, Tensor]


class FrozenTeacher:
    """A teacher detector pinned in eval mode; only its backbone (and, for the response terms,
    its heads on given RoIs) runs.

    `scale` is how many times the student's input size it reads. At 1 it runs on the
    student's transformed batch; above, on the same images resized by its own transform (what
    it was trained on), padded to exactly `scale` times the student's batch so that every
    level pools onto the student's grid.
    """

    def __init__(self, detector: nn.Module, scale: int = 1) -> None:
        if scale < 1:
            raise ValueError(f"scale must be a positive whole number, got {scale}")
        self.detector = detector.eval()
        self.scale = scale
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

    @torch.no_grad()
    def batch(self, images: list[Tensor], student_batch: Tensor) -> Tensor:
        """The teacher's input for the student's batch: that batch itself at scale 1, else
        `images` resized by the teacher's transform onto a grid `scale` times the student's.

        Resizing by `scale` times the factor can round up to `scale - 1` pixels past `scale`
        times the student's image; those rows or columns, at the image's far edge, are dropped
        so that the grids stay aligned.
        """
        if self.scale == 1:
            return student_batch.detach()
        self.detector.eval()
        own = self.detector.transform([im.detach() for im in images])[0].tensors
        n, c, h, w = student_batch.shape
        out = own.new_zeros((n, c, h * self.scale, w * self.scale))
        hh, ww = min(out.shape[-2], own.shape[-2]), min(out.shape[-1], own.shape[-1])
        out[..., :hh, :ww] = own[..., :hh, :ww]
        return out

    def view(self, images: list[Tensor], student_batch: Tensor) -> TeacherView:
        """Run the backbone on `images` as the student saw them in `student_batch`."""
        raw = self.backbone(self.batch(images, student_batch))
        hw = (int(student_batch.shape[-2]), int(student_batch.shape[-1]))
        on_grid = raw if self.scale == 1 else self._on_student_grid(raw)
        return TeacherView(raw, name_levels(on_grid, hw))

    def _on_student_grid(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each level pooled onto the student's grid.

        A cell of stride s sits over input pixel s * i, so the student's cell j sits where the
        teacher's cell k * j does: each pooled cell averages that one and its neighbours up to
        halfway to the next (a centred (2k-1)-wide window, stride k; ceil(n/k) cells, the
        student's count). Faster R-CNN's top level is no convolution but every other cell of
        the level below (`LastLevelMaxPool`), so it is taken the same way from the pooled level
        below, as the student's own is.
        """
        k = self.scale
        out: dict[str, Tensor] = {}
        for key, f in raw.items():
            if key == "pool" and out:
                out[key] = F.max_pool2d(next(reversed(out.values())), 1, 2)
            else:
                out[key] = F.avg_pool2d(f, 2 * k - 1, k, k - 1, count_include_pad=False)
        return out

    def features(self, images: list[Tensor], student_batch: Tensor) -> dict[str, Tensor]:
        return self.view(images, student_batch).levels

    @torch.no_grad()
    def heads(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        objectness: bool = False,
    ) -> HeadOutputs:
        """The teacher box head's class scores and deltas for given RoIs (in the student's
        image coordinates), and (if asked) its RPN's objectness of every anchor, on the
        teacher's own features (`TeacherView.raw`). Box deltas are relative to each RoI's
        size, so they compare across scales as they are."""
        if objectness and self.scale != 1:
            raise ValueError("objectness is compared anchor by anchor: it needs scale 1")
        heads = self.detector.roi_heads
        if self.scale != 1:
            proposals = [p * self.scale for p in proposals]
            image_shapes = [(h * self.scale, w * self.scale) for h, w in image_shapes]
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
        teacher = self.teacher.view(images, batch)
        if features:
            assert self.distiller is not None
            student = rec.levels()
            if self.detach_student:
                student = {name: f.detach() for name, f in student.items()}
            inputs = DistillInputs(
                student=student,
                teacher=teacher.levels,
                boxes=[t["boxes"].detach() for t in rec.targets],
                image_size=(int(batch.shape[-2]), int(batch.shape[-1])),
            )
            for k, v in self.distiller(inputs).items():
                losses[f"distill.{k}"] = v
        if self._response is not None:
            terms = self._response.losses(
                self.teacher, teacher.raw, rec.targets, self.detach_student
            )
            for k, v in terms.items():
                losses[f"distill.{k}"] = v
        rec.reset()
        return losses
