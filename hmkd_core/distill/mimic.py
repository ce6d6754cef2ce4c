"""FitNet-style feature mimicking: the plainest baseline (HMKD.md §3, `mimic`).

`loss_mimic_<lv> = weight * scale * mean((Align_l(S_l) - T_l)^2)` over every position and
channel, foreground or not: what HMKD's background handling is measured against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor

from hmkd_core.distill.base import Distiller, DistillInputs, build_aligners, check_inputs
from hmkd_core.spec import MimicOptions


class MimicDistiller(Distiller):
    """Mean squared error between the aligned student and the teacher at every level."""

    def __init__(
        self,
        levels: Sequence[str],
        *,
        student_channels: int,
        teacher_channels: int,
        opts: MimicOptions,
        scale: float = 1.0,
        level_weights: Mapping[str, float] | None = None,
        standardized: bool = False,
    ) -> None:
        super().__init__(levels, level_weights, standardized=standardized)
        self.weight = opts.weight * scale
        self.align = build_aligners(
            self.levels, student_channels, teacher_channels, standardized=standardized
        )

    def level_losses(self, inputs: DistillInputs) -> dict[str, Tensor]:
        check_inputs(self, inputs)
        return {
            f"loss_mimic_{lv}": self.weight
            * F.mse_loss(self.align[lv](inputs.student[lv]), inputs.teacher[lv].detach())
            for lv in self.levels
        }
