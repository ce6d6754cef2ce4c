"""The HMKD distiller: hierarchical matching plus the supplementary distillation module.

`L = w_hm * sum_l L_hm_l + w_sdm * sum_l (L_sdm_fg_l + L_sdm_bg_l + L_sdm_att_l)`, each term a
named `loss_*` entry, times the whole-loss `scale` (`DistillSpec.weight`). One 1x1 adapter
`Align_l` per level maps the student to the teacher's channels; HM's keys/values and SDM's
feature comparison share it, so both train the same student-side projection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from hmkd_core.distill.base import Distiller, DistillInputs, build_aligners, check_inputs
from hmkd_core.distill.focal import focal_feature_loss
from hmkd_core.distill.hm import HierarchicalMatching
from hmkd_core.distill.masks import level_masks
from hmkd_core.spec import HMKDOptions


class HMKDDistiller(Distiller):
    """HM (if `opts.hm.enabled`) and SDM (if `opts.sdm.enabled`) on the given levels.

    Returns `loss_hm_<lv>` and `loss_sdm_{fg,bg,att}_<lv>` per level, already weighted.
    """

    def __init__(
        self,
        levels: Sequence[str],
        *,
        student_channels: int,
        teacher_channels: int,
        opts: HMKDOptions,
        scale: float = 1.0,
        level_weights: Mapping[str, float] | None = None,
        standardized: bool = False,
    ) -> None:
        super().__init__(levels, level_weights, standardized=standardized)
        if not (opts.hm.enabled or opts.sdm.enabled):
            raise ValueError("hmkd needs hm or sdm enabled (use method: none for neither)")
        self.opts = opts
        self.scale = scale
        self.align = build_aligners(
            self.levels, student_channels, teacher_channels, standardized=standardized
        )
        # A student narrower than the teacher: HM's keys/values are cheaper computed from S_l
        # through the composed map Wkv . Align_l than from Align_l(S_l) (same values). A
        # standardized aligner is not linear, so there is no composed map then.
        self.compose_align = student_channels < teacher_channels and not standardized
        self.hm = (
            HierarchicalMatching(self.levels, teacher_channels, opts.hm)
            if opts.hm.enabled
            else None
        )

    def level_losses(self, inputs: DistillInputs) -> dict[str, Tensor]:
        check_inputs(self, inputs)
        teacher = {lv: inputs.teacher[lv].detach() for lv in self.levels}
        aligned = {lv: self.align[lv](inputs.student[lv]) for lv in self.levels}
        masks = level_masks(inputs.boxes, teacher, self.levels)
        losses: dict[str, Tensor] = {}
        if self.hm is not None:
            w = self.opts.w_hm * self.scale
            raw = (
                {lv: (inputs.student[lv], self.align[lv]) for lv in self.levels}
                if self.compose_align
                else None
            )
            query_teacher = {**inputs.teacher, **teacher}  # deep levels for query_levels: deep
            for lv, loss in self.hm(aligned, query_teacher, masks, raw).items():
                losses[f"loss_hm_{lv}"] = w * loss
        if self.opts.sdm.enabled:
            w = self.opts.w_sdm * self.scale
            for lv in self.levels:
                terms = focal_feature_loss(aligned[lv], teacher[lv], *masks[lv], self.opts.sdm)
                for name, loss in terms.items():
                    losses[f"loss_sdm_{name}_{lv}"] = w * loss
        return losses
