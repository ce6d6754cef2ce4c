"""Response distillation: the teacher's detection heads, on what the student's heads saw.

Feature distillers pull intermediate maps toward the teacher's, and a student whose features
already serve its own heads can pay for that pull. Here the teacher's heads answer the very
questions the student's heads were trained on in the same step, on the teacher's own features,
and the student is asked to answer alike: the teacher's knowledge reaches the student through
the outputs it is judged on, and no student-side adapter is needed. Three terms, each off at
weight 0:

- class scores of the RoIs the student's box head sampled (Hinton et al.'s soft targets);
- box deltas of those RoIs that hold an object, for the object's class, where the teacher's
  deltas are closer to the ground truth than the student's (a teacher that regresses worse
  than the student has nothing to teach there; Chen et al., NeurIPS 2017, bound the same way);
- RPN objectness of every anchor, as a Bernoulli divergence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

# torchvision's Faster R-CNN box-regression smooth-L1 transition (fastrcnn_loss)
BOX_BETA = 1.0 / 9.0


def class_score_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of the temperature-softened class scores, times T^2, per RoI.

    The T^2 factor keeps the gradient's size independent of T (Hinton et al., 2015), so a
    weight calibrated at one temperature stays meaningful at another. float32: the softmax of
    a bf16 logit over a few classes loses the small probabilities the student learns from.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student class scores {tuple(student_logits.shape)} and teacher's "
            f"{tuple(teacher_logits.shape)} differ: both box heads must score the same RoIs "
            "over the same classes"
        )
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    p_teacher = F.softmax(teacher_logits.detach().float() / t, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * (t * t)


def match_rois(
    proposals: list[Tensor],
    targets: list[dict[str, Tensor]],
    fg_iou: float,
    box_coder: object,
) -> tuple[Tensor, Tensor]:
    """Each RoI's class (0: background) and its ground-truth box deltas, as `roi_heads` assigns
    them for its own loss: the box it overlaps most, if at IoU `fg_iou` or more (the heads'
    matcher threshold), encoded by the heads' box coder.

    Recomputed from the RoIs rather than captured, because torchvision's heads keep them local;
    written without boolean indexing, so it never waits on the device.
    """
    labels: list[Tensor] = []
    deltas: list[Tensor] = []
    for rois, target in zip(proposals, targets, strict=True):
        gt = target["boxes"].to(rois.dtype)
        if gt.numel() == 0:
            labels.append(torch.zeros(len(rois), dtype=torch.int64, device=rois.device))
            deltas.append(torch.zeros(len(rois), 4, dtype=rois.dtype, device=rois.device))
            continue
        best, idx = box_iou(gt, rois).max(dim=0)
        labels.append(target["labels"].to(torch.int64)[idx] * (best >= fg_iou))
        deltas.append(box_coder.encode_single(gt[idx], rois))  # type: ignore[attr-defined]
    return torch.cat(labels), torch.cat(deltas)


def box_delta_kd(
    student_deltas: Tensor, teacher_deltas: Tensor, labels: Tensor, targets: Tensor
) -> Tensor:
    """Smooth-L1 from the student's deltas to the teacher's, for each foreground RoI's class,
    on the RoIs whose teacher deltas are nearer the ground truth (L1) than the student's.

    Summed and divided by the number of RoIs, foreground or not, as the detector's own box
    loss is: a weight of 1 makes a RoI's pull as strong as its ground-truth regression. Masked
    rather than indexed, so it never waits on the device.
    """
    if student_deltas.shape != teacher_deltas.shape:
        raise ValueError(
            f"student box deltas {tuple(student_deltas.shape)} and teacher's "
            f"{tuple(teacher_deltas.shape)} differ: both box heads must regress the same RoIs "
            "for the same classes"
        )
    n = labels.numel()
    if n == 0:
        return student_deltas.sum() * 0.0
    cls = labels.view(n, 1, 1).expand(n, 1, 4)
    s = student_deltas.reshape(n, -1, 4).gather(1, cls).squeeze(1).float()
    t = teacher_deltas.detach().reshape(n, -1, 4).gather(1, cls).squeeze(1).float()
    y = targets.float()
    better = (t - y).abs().sum(1) < (s.detach() - y).abs().sum(1)
    pulled = (labels > 0) & better
    per_roi = F.smooth_l1_loss(s, t, beta=BOX_BETA, reduction="none").sum(1)
    return (per_roi * pulled).sum() / n


def objectness_kd(student: list[Tensor], teacher: list[Tensor], normaliser: float) -> Tensor:
    """KL(teacher || student) of each anchor's object probability, summed over every anchor of
    every level and divided by `normaliser` (the RPN's sampled anchors per batch, so a weight
    of 1 pulls an anchor as hard as the RPN's own loss pulls a sampled one)."""
    if len(student) != len(teacher) or any(
        s.shape != t.shape for s, t in zip(student, teacher, strict=False)
    ):
        raise ValueError(
            f"student objectness maps {[tuple(s.shape) for s in student]} and teacher's "
            f"{[tuple(t.shape) for t in teacher]} differ: both RPNs must score the same anchors"
        )
    bce = F.binary_cross_entropy_with_logits
    total = student[0].sum() * 0.0
    for s, t in zip(student, teacher, strict=True):
        s, t = s.float(), t.detach().float()
        p = torch.sigmoid(t)
        total = total + (bce(s, p, reduction="none") - bce(t, p, reduction="none")).sum()
    return total / normaliser


@dataclass
class HeadOutputs:
    """What one detector's heads gave for the student's sampled RoIs and anchors."""

    class_logits: Tensor  # (R, C)
    box_deltas: Tensor  # (R, 4C)
    objectness: list[Tensor] | None = None  # per level (B, A, H, W); None when not asked for


@dataclass
class RoITargets:
    """The student's sampled RoIs' classes (0: background) and ground-truth deltas (None where
    no term reads them: matching costs a box IoU per image), and the number of anchors the
    student's RPN samples per batch."""

    labels: Tensor | None
    deltas: Tensor | None
    rpn_samples: float


class ResponseDistiller(nn.Module):
    """`loss_response` (class scores), `loss_response_box` and `loss_response_objectness`,
    each present only at a weight above 0. No parameters of its own."""

    def __init__(
        self,
        weight: float = 0.0,
        temperature: float = 1.0,
        box_weight: float = 0.0,
        objectness_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if min(weight, box_weight, objectness_weight) < 0 or temperature <= 0:
            raise ValueError("response weights must be >= 0 and temperature > 0")
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.box_weight = float(box_weight)
        self.objectness_weight = float(objectness_weight)

    @property
    def needs_objectness(self) -> bool:
        return self.objectness_weight > 0

    @property
    def needs_roi_targets(self) -> bool:
        return self.box_weight > 0

    def forward(
        self, student: HeadOutputs, teacher: HeadOutputs, rois: RoITargets
    ) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        if self.weight > 0:
            kd = class_score_kd(student.class_logits, teacher.class_logits, self.temperature)
            losses["loss_response"] = self.weight * kd
        if self.box_weight > 0:
            if rois.labels is None or rois.deltas is None:
                raise ValueError("box-delta distillation needs the RoIs' classes and deltas")
            kd = box_delta_kd(student.box_deltas, teacher.box_deltas, rois.labels, rois.deltas)
            losses["loss_response_box"] = self.box_weight * kd
        if self.objectness_weight > 0:
            if student.objectness is None or teacher.objectness is None:
                raise ValueError("objectness distillation needs both RPNs' objectness maps")
            kd = objectness_kd(student.objectness, teacher.objectness, rois.rpn_samples)
            losses["loss_response_objectness"] = self.objectness_weight * kd
        return losses
