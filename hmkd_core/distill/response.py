"""Class-score (response) distillation on the RoIs the student's box head trained on.

Feature distillers pull intermediate maps toward the teacher's, and a student whose features
already serve its own heads can pay for that pull. Here the teacher's box head scores the very
RoIs the student's box head was trained on in the same step, on the teacher's own features, and
the student is asked to match those soft scores: the teacher's knowledge reaches the student
through the output it is judged on, and no student-side adapter is needed.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


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


class ResponseDistiller(nn.Module):
    """`loss_response`: `weight` times `class_score_kd`. No parameters of its own."""

    def __init__(self, weight: float, temperature: float = 1.0) -> None:
        super().__init__()
        if weight < 0 or temperature <= 0:
            raise ValueError("response weight must be >= 0 and temperature > 0")
        self.weight = float(weight)
        self.temperature = float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> dict[str, Tensor]:
        loss = class_score_kd(student_logits, teacher_logits, self.temperature)
        return {"loss_response": self.weight * loss}
