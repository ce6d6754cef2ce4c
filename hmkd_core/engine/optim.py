"""Optimizer and per-iteration learning-rate schedule built from a `ScheduleSpec`.

Detection training is counted in iterations, not epochs, so the scheduler is stepped once per
iteration and its factor is a pure function of the iteration (`lr_factor`), testable on its
own and identical after a resume. Norm weights and biases get no weight decay: decaying them
pulls BatchNorm/GroupNorm scales towards zero without regularising anything useful.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from hmkd_core.spec import ScheduleSpec

_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Split the trainable parameters of `modules` into a decayed and a non-decayed group.

    No decay: every parameter of a norm layer and every parameter with at most one dimension
    (biases, scales). Frozen parameters (requires_grad False) are left out, and a parameter
    shared by several modules appears once. Empty groups are omitted.
    """
    decay: list[Tensor] = []
    no_decay: list[Tensor] = []
    seen: set[int] = set()
    for root in modules:
        for module in root.modules():
            for param in module.parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                if isinstance(module, _NORM_TYPES) or param.ndim <= 1:
                    no_decay.append(param)
                else:
                    decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    params: Iterable[Tensor] | list[dict[str, Any]], schedule: ScheduleSpec
) -> Optimizer:
    """SGD (momentum) or AdamW at `schedule.lr`.

    params: tensors, which all get `schedule.weight_decay`, or groups from `param_groups`,
        whose own `weight_decay` wins.
    """
    params = list(params)
    if not params or all(isinstance(g, dict) and not g["params"] for g in params):
        raise ValueError(
            "no trainable parameters to optimise; check that the model is not entirely frozen"
        )
    if schedule.optimizer == "sgd":
        return SGD(
            params,
            lr=schedule.lr,
            momentum=schedule.momentum,
            weight_decay=schedule.weight_decay,
        )
    if schedule.optimizer == "adamw":
        return AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    raise ValueError(f"unknown optimizer {schedule.optimizer!r}; choose 'sgd' or 'adamw'")


def lr_factor(iteration: int, schedule: ScheduleSpec) -> float:
    """Multiplier of the base lr for the step taken at `iteration` (0-based).

    Linear warmup from `warmup_factor` (iteration 0) to 1 (iteration `warmup_iters`), times
    the main schedule: `step` multiplies by `gamma` from each `steps` fraction of `iterations`
    on, `cosine` falls from 1 to 0 at `iterations`, `constant` stays 1.
    """
    if schedule.scheduler == "step":
        milestones = [round(f * schedule.iterations) for f in schedule.steps]
        main = schedule.gamma ** bisect.bisect_right(milestones, iteration)
    elif schedule.scheduler == "cosine":
        progress = min(iteration, schedule.iterations) / schedule.iterations
        main = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule.scheduler == "constant":
        main = 1.0
    else:
        raise ValueError(
            f"unknown scheduler {schedule.scheduler!r}; choose 'step', 'cosine' or 'constant'"
        )
    if iteration < schedule.warmup_iters:
        alpha = iteration / schedule.warmup_iters
        main *= schedule.warmup_factor * (1.0 - alpha) + alpha
    return main


def build_scheduler(optimizer: Optimizer, schedule: ScheduleSpec) -> LambdaLR:
    """A LambdaLR over `lr_factor`; call `.step()` once after every optimizer step.

    The factor is a plain function closure, so `state_dict()` stores only the position
    (`last_epoch`) and the lrs, and a scheduler rebuilt from the same spec resumes exactly.
    """
    spec = schedule.model_copy(deep=True)  # later edits to the caller's spec must not leak in

    def factor(iteration: int) -> float:
        return lr_factor(iteration, spec)

    return LambdaLR(optimizer, lr_lambda=factor)


def clip_groups(modules: Sequence[nn.Module], apart: bool) -> list[list[nn.Parameter]]:
    """The parameter sets whose gradient norm is clipped as one, the student's first.

    Clipped jointly, a distiller whose own gradients are large (MGD's generator at its
    calibrated weight fires the clip on every step) scales the student's detection step down
    with its own; clipped apart, each module's step is bounded by its own norm only.
    """
    groups = [[p for p in m.parameters() if p.requires_grad] for m in modules]
    if not apart:
        return [[p for g in groups for p in g]]
    return [g for g in groups if g]
