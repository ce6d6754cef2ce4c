"""Focal and Global Distillation (Yang et al., CVPR 2022), the `fgd` baseline.

Focal part: the same foreground/background/attention terms as HMKD's SDM (`focal.py`).
Global part: a GcBlock (global context modelling: attention-pooled context vector, then a
bottleneck transform added back to every position) is applied to the aligned student and to the
teacher, and the two results are compared, so the student also learns the relations between
pixels that the masks cut apart. As in FGD, the student and the teacher side each have their own
GcBlock, both trained by this loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from hmkd_core.distill.base import Distiller, DistillInputs, build_aligners, check_inputs
from hmkd_core.distill.focal import focal_feature_loss
from hmkd_core.distill.masks import level_masks
from hmkd_core.spec import FGDOptions


class GcBlock(nn.Module):
    """Global context block: (B, C, H, W) -> (B, C, H, W), `x + T(softmax_hw(Wk x) . x)`.

    The transform `T` is conv1x1 (C -> C/2), LayerNorm, ReLU, conv1x1 (C/2 -> C); its last conv
    starts at zero, so the block starts as the identity.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 2, 1)
        self.context_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        # FGD's initialisation: Kaiming (fan-in) for the context mask, zeros for the last conv
        nn.init.kaiming_normal_(self.context_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context_mask.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def context(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, 1, 1): features pooled with a learnt spatial softmax."""
        b, c, h, w = x.shape
        attn = torch.softmax(self.context_mask(x).reshape(b, 1, h * w), dim=2)  # (B, 1, HW)
        pooled = torch.bmm(x.reshape(b, c, h * w), attn.transpose(1, 2))  # (B, C, 1)
        return pooled.reshape(b, c, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.transform(self.context(x))


def global_relation_loss(
    student_aligned: Tensor, teacher: Tensor, gc_student: GcBlock, gc_teacher: GcBlock
) -> Tensor:
    """sum (GcBlock_s(S') - GcBlock_t(T))^2 / B over (B, C, H, W) maps."""
    diff = gc_student(student_aligned) - gc_teacher(teacher)
    return diff.pow(2).sum() / teacher.shape[0]


class FGDDistiller(Distiller):
    """`loss_fgd_{fg,bg,att}_<lv>` (if `opts.focal.enabled`) and `loss_fgd_global_<lv>`."""

    def __init__(
        self,
        levels: Sequence[str],
        *,
        student_channels: int,
        teacher_channels: int,
        opts: FGDOptions,
        scale: float = 1.0,
        level_weights: Mapping[str, float] | None = None,
        standardized: bool = False,
    ) -> None:
        super().__init__(levels, level_weights, standardized=standardized)
        self.opts = opts
        self.weight = opts.weight * scale
        self.align = build_aligners(
            self.levels, student_channels, teacher_channels, standardized=standardized
        )
        self.gc_student = nn.ModuleDict({lv: GcBlock(teacher_channels) for lv in self.levels})
        self.gc_teacher = nn.ModuleDict({lv: GcBlock(teacher_channels) for lv in self.levels})

    def level_losses(self, inputs: DistillInputs) -> dict[str, Tensor]:
        check_inputs(self, inputs)
        teacher = {lv: inputs.teacher[lv].detach() for lv in self.levels}
        masks = level_masks(inputs.boxes, teacher, self.levels) if self.opts.focal.enabled else {}
        losses: dict[str, Tensor] = {}
        for lv in self.levels:
            aligned = self.align[lv](inputs.student[lv])
            if self.opts.focal.enabled:
                terms = focal_feature_loss(aligned, teacher[lv], *masks[lv], self.opts.focal)
                for name, loss in terms.items():
                    losses[f"loss_fgd_{name}_{lv}"] = self.weight * loss
            rela = global_relation_loss(
                aligned, teacher[lv], self.gc_student[lv], self.gc_teacher[lv]
            )
            losses[f"loss_fgd_global_{lv}"] = self.weight * self.opts.global_weight * rela
        return losses
