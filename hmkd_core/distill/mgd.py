"""Masked Generative Distillation (Yang et al., ECCV 2022), the `mgd` baseline.

The student must *generate* the teacher's feature from a randomly masked version of its own:
a fraction `mask_ratio` of positions of `Align_l(S_l)` is zeroed (the same positions across
channels), a small conv generator fills them in, and the result is compared to `T_l`. The
generator is training-only; it pushes the student to encode neighbourhood context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from hmkd_core.distill.base import Distiller, DistillInputs, build_aligners, check_inputs
from hmkd_core.spec import MGDOptions


def random_spatial_mask(like: Tensor, mask_ratio: float) -> Tensor:
    """(B, 1, H, W) of {0, 1} for a (B, C, H, W) map: each position dropped w.p. `mask_ratio`."""
    b, _, h, w = like.shape
    keep = torch.rand(b, 1, h, w, device=like.device) >= mask_ratio
    return keep.to(like.dtype)


class Generator(nn.Sequential):
    """conv - ReLU - conv in the teacher's channel count, keeping the grid.

    MGD's is 3x3 (`kernel=3`): it rebuilds a masked cell from its neighbours. HM's decoder
    already mixes each cell's 3x3 neighbourhood by attention, so HM may use 1x1 convs, about a
    ninth of the cost on the finest level, where the 3x3 pair is most of the distiller's step.
    """

    def __init__(self, channels: int, kernel: int = 3) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, kernel_size=kernel, padding=kernel // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=kernel, padding=kernel // 2),
        )


class MGDDistiller(Distiller):
    """`loss_mgd_<lv> = weight * scale * sum (G(mask * Align(S)) - T)^2 / B` per level."""

    def __init__(
        self,
        levels: Sequence[str],
        *,
        student_channels: int,
        teacher_channels: int,
        opts: MGDOptions,
        scale: float = 1.0,
        level_weights: Mapping[str, float] | None = None,
        standardized: bool = False,
    ) -> None:
        super().__init__(levels, level_weights, standardized=standardized)
        self.mask_ratio = opts.mask_ratio
        self.weight = opts.weight * scale
        self.align = build_aligners(
            self.levels, student_channels, teacher_channels, standardized=standardized
        )
        self.generate = nn.ModuleDict({lv: Generator(teacher_channels) for lv in self.levels})

    def level_losses(self, inputs: DistillInputs) -> dict[str, Tensor]:
        check_inputs(self, inputs)
        losses = {}
        for lv in self.levels:
            aligned = self.align[lv](inputs.student[lv])
            teacher = inputs.teacher[lv].detach()
            generated = self.generate[lv](aligned * random_spatial_mask(aligned, self.mask_ratio))
            sq = (generated - teacher).pow(2).sum()
            losses[f"loss_mgd_{lv}"] = self.weight * sq / teacher.shape[0]
        return losses
