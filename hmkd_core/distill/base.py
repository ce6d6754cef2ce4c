"""The distiller contract: features in, a dict of named losses out.

A distiller is a trainable `nn.Module` kept beside the student (saved in training checkpoints,
never in the exported student). It sees only FPN feature maps and the ground-truth boxes in the
coordinates of the batch tensor both detectors ran on, so it works for any torchvision-style
detector whose features were captured by hooks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from hmkd_core.spec import resolve_level_weights


def level_stride(level: str) -> int:
    """`p3` -> 8: FPN level k has stride 2**k relative to the (padded) input tensor."""
    return 2 ** int(level[1:])


@dataclass
class DistillInputs:
    """What every distiller receives for one batch.

    student / teacher: level name (`p2`...) -> (B, C, H_l, W_l) feature maps; the student's
        carry gradients, the teacher's were computed under no_grad.
    boxes: per image, (N_i, 4) float xyxy ground-truth boxes (crowd boxes excluded) in pixel
        coordinates of the padded batch tensor of size `image_size` (H, W).
    """

    student: dict[str, Tensor]
    teacher: dict[str, Tensor]
    boxes: list[Tensor]
    image_size: tuple[int, int]


class Distiller(nn.Module):
    """Base class: subclasses set `levels` and implement `level_losses`, whose `loss_*` entries
    each end in the level they were computed at (`loss_mimic_p2`).

    `forward` multiplies each entry by its level's weight (`DistillSpec.level_weights`), so the
    multiplier is applied the same way for every method and only here. With `standardized`
    (`DistillSpec.standardize`) it also hands the subclass teacher maps standardized per image
    and channel; the subclass builds its aligners with the same flag (`build_aligners`), so
    the student side is standardized after its adapter and both sides meet on one scale.
    """

    levels: tuple[str, ...]

    def __init__(
        self,
        levels: Sequence[str],
        level_weights: Mapping[str, float] | None = None,
        *,
        standardized: bool = False,
    ) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.level_weights = resolve_level_weights(
            self.levels, level_weights or {}, "distill.level_weights"
        )
        self.standardized = standardized

    def level_losses(self, inputs: DistillInputs) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, inputs: DistillInputs) -> dict[str, Tensor]:
        if self.standardized:
            teacher = {lv: standardize(t.detach()) for lv, t in inputs.teacher.items()}
            inputs = replace(inputs, teacher=teacher)
        losses = self.level_losses(inputs)
        if all(w == 1.0 for w in self.level_weights.values()):
            return losses
        return {
            name: self.level_weights[level_of(name, self.levels)] * v for name, v in losses.items()
        }


def level_of(name: str, levels: Sequence[str]) -> str:
    """The level a loss entry was computed at, from its name's last part: `loss_hm_p3` -> `p3`."""
    level = name.rsplit("_", 1)[-1]
    if level not in levels:
        raise ValueError(f"distiller loss {name!r} names no distilled level ({list(levels)})")
    return level


class NoDistiller(Distiller):
    """`none`: the student alone. Returns no losses, has no parameters."""

    def level_losses(self, inputs: DistillInputs) -> dict[str, Tensor]:
        return {}


def check_inputs(distiller: Distiller, inputs: DistillInputs) -> None:
    """Fail early with a message naming the level when features are missing or misshapen."""
    for level in distiller.levels:
        for side, feats in (("student", inputs.student), ("teacher", inputs.teacher)):
            if level not in feats:
                raise KeyError(f"{side} has no feature level {level!r}; has {sorted(feats)}")
        s, t = inputs.student[level], inputs.teacher[level]
        if s.shape[0] != t.shape[0] or s.shape[-2:] != t.shape[-2:]:
            raise ValueError(
                f"level {level}: student {tuple(s.shape)} and teacher {tuple(t.shape)} differ in "
                "batch or spatial size; both detectors must run on the same batch tensor"
            )


def zeros_like_loss(ref: Tensor) -> Tensor:
    """A zero that stays in the autograd graph, so DDP sees every parameter used."""
    return ref.sum() * 0.0 if ref.requires_grad else torch.zeros((), device=ref.device)


def standardize(feat: Tensor, eps: float = 1e-5) -> Tensor:
    """Each image's channel to zero mean and unit variance over its positions.

    Comparing standardized maps (Pearson-correlation distillation, Cao et al., NeurIPS 2022)
    asks the student for the teacher's pattern of activity, not its magnitudes: a student
    whose channels run at other scales, as a smaller or differently trained backbone's do, is
    not pulled to rescale them, which is the part of a feature loss the detector head, fitted
    to the student's own scales, pays for.
    """
    mean = feat.mean(dim=(2, 3), keepdim=True)
    var = feat.var(dim=(2, 3), keepdim=True, unbiased=False)
    return (feat - mean) * torch.rsqrt(var + eps)


class Standardize(nn.Module):
    """`standardize` as a layer, so an aligner can end with it."""

    def forward(self, feat: Tensor) -> Tensor:
        return standardize(feat)


def build_aligners(
    levels: tuple[str, ...] | list[str],
    student_channels: int,
    teacher_channels: int,
    *,
    standardized: bool = False,
) -> nn.ModuleDict:
    """One FitNet adapter per level: a 1x1 conv from the student's to the teacher's channels,
    followed by `Standardize` when the distiller compares standardized maps.

    Always present and trained, even when the channel counts match (HMKD.md, Notation).
    """

    def adapter() -> nn.Module:
        conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        return nn.Sequential(conv, Standardize()) if standardized else conv

    return nn.ModuleDict({lv: adapter() for lv in levels})
