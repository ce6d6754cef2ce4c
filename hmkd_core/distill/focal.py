"""The focal feature terms shared by HMKD's SDM and by FGD (HMKD.md §2).

The squared feature error between the aligned student and the teacher is weighted by the
teacher's spatial and channel attention (spend the effort where the teacher looks) and split
into foreground and background by the ground-truth masks: background is damped (`beta <
alpha`), not ignored, which is how the module suppresses background noise. An attention
transfer term makes the student look where the teacher looks. Every sum is divided by the batch
size, so the loss does not grow with it.
"""

from __future__ import annotations

from torch import Tensor

from hmkd_core.distill.masks import channel_attention, spatial_attention
from hmkd_core.spec import FocalOptions


def focal_feature_loss(
    student_aligned: Tensor, teacher: Tensor, fg: Tensor, weight: Tensor, opts: FocalOptions
) -> dict[str, Tensor]:
    """Foreground, background and attention terms of one level, already weighted.

    student_aligned, teacher: (B, C, H, W), the student already mapped to the teacher's
    channels. fg, weight: (B, 1, H, W) from `masks.batch_masks`.
    Returns `fg` (alpha * sum M*W*A_s*A_c*(T-S)^2 / B), `bg` (the same with beta and 1-M) and
    `att` (gamma * (|A_s^T - A_s^S|_1 + |A_c^T - A_c^S|_1) / B), each a scalar.
    """
    teacher = teacher.detach()
    b = teacher.shape[0]
    tau, norm = opts.temperature, opts.normalize
    s_att_t = spatial_attention(teacher, tau, normalize=norm)
    c_att_t = channel_attention(teacher, tau, normalize=norm)
    s_att_s = spatial_attention(student_aligned, tau, normalize=norm)
    c_att_s = channel_attention(student_aligned, tau, normalize=norm)

    # (B, 1, H, W) x (B, C, 1, 1) weighting of the squared error; fg/bg split by the mask.
    sq_err = (teacher - student_aligned).pow(2) * c_att_t  # (B, C, H, W)
    per_pos = sq_err.sum(dim=1, keepdim=True) * (s_att_t * weight)  # (B, 1, H, W)
    fg_sum = (per_pos * fg).sum()
    bg_sum = (per_pos * (1.0 - fg)).sum()
    att = (s_att_t - s_att_s).abs().sum() + (c_att_t - c_att_s).abs().sum()
    return {
        "fg": opts.alpha * fg_sum / b,
        "bg": opts.beta * bg_sum / b,
        "att": opts.gamma * att / b,
    }
