"""Method name -> distiller class, and the one function that builds a distiller from the spec.

`DistillSpec.weight` (the whole-loss multiplier) is passed to the distiller as `scale` here and
nowhere else, and `DistillSpec.level_weights` beside it; each method's own weights
(`mimic.weight`, `hmkd.w_hm`, ...) are applied inside.
"""

from __future__ import annotations

from collections.abc import Sequence

from hmkd_core.distill.base import Distiller, NoDistiller
from hmkd_core.distill.fgd import FGDDistiller
from hmkd_core.distill.hmkd import HMKDDistiller
from hmkd_core.distill.mgd import MGDDistiller
from hmkd_core.distill.mimic import MimicDistiller
from hmkd_core.distill.response import ResponseDistiller
from hmkd_core.spec import METHODS, DistillSpec

DISTILLERS: dict[str, type[Distiller]] = {
    "none": NoDistiller,
    "mimic": MimicDistiller,
    "fgd": FGDDistiller,
    "mgd": MGDDistiller,
    "hmkd": HMKDDistiller,
}
assert tuple(DISTILLERS) == METHODS, "hmkd_core.spec.METHODS and DISTILLERS must agree"


def build_distiller(
    spec: DistillSpec, *, levels: Sequence[str], student_channels: int, teacher_channels: int
) -> Distiller:
    """The distiller `spec.method` names, over `levels`, mapping student to teacher channels.

    levels: the distilled levels resolved by the caller (`spec.levels` or the detector's three
    finest). Raises ValueError for an unknown method or an impossible configuration.
    """
    if spec.method not in DISTILLERS:
        raise ValueError(
            f"unknown distillation method {spec.method!r}; choose from {list(DISTILLERS)}"
        )
    if spec.method == "none":
        return NoDistiller(levels)
    if not levels:
        raise ValueError(f"{spec.method} needs at least one level to distil")
    opts = getattr(spec, spec.method)  # each method's options block is named after it
    cls = DISTILLERS[spec.method]
    return cls(
        levels,
        student_channels=student_channels,
        teacher_channels=teacher_channels,
        opts=opts,
        scale=spec.weight,
        level_weights=spec.level_weights,
        standardized=spec.standardize,
    )


def build_response(spec: DistillSpec) -> ResponseDistiller | None:
    """The response terms `spec.response` asks for beside the feature method, or None when
    every weight is 0. Not scaled by `spec.weight`, so a row can keep one and drop the other."""
    opts = spec.response
    if not opts.active:
        return None
    return ResponseDistiller(opts.weight, opts.temperature, opts.box_weight, opts.objectness_weight)
