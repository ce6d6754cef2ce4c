"""Optimizer groups and the per-iteration learning-rate schedule."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from hmkd_core.engine.optim import (
    build_optimizer,
    build_scheduler,
    clip_groups,
    lr_factor,
    param_groups,
)
from hmkd_core.spec import ScheduleSpec


def lrs_over(schedule: ScheduleSpec, count: int) -> list[float]:
    """The lr each of the first `count` iterations trains with, stepping once per iteration."""
    optimizer = build_optimizer([nn.Parameter(torch.zeros(2, 2))], schedule)
    scheduler = build_scheduler(optimizer, schedule)
    lrs = []
    for _ in range(count):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_starts_at_factor_and_reaches_base_lr() -> None:
    schedule = ScheduleSpec(
        lr=0.1, iterations=100, warmup_iters=10, warmup_factor=0.01, scheduler="constant"
    )
    lrs = lrs_over(schedule, 12)
    assert lrs[0] == pytest.approx(0.1 * 0.01)
    assert lrs[5] == pytest.approx(0.1 * (0.01 * 0.5 + 0.5))  # halfway, linear
    assert lrs[10] == pytest.approx(0.1)
    assert lrs[11] == pytest.approx(0.1)
    assert lrs[:11] == sorted(lrs[:11])


def test_step_decay_at_the_right_iterations() -> None:
    schedule = ScheduleSpec(
        lr=1.0, iterations=100, warmup_iters=0, scheduler="step", steps=[0.5, 0.8], gamma=0.1
    )
    lrs = lrs_over(schedule, 100)
    assert lrs[49] == pytest.approx(1.0)
    assert lrs[50] == pytest.approx(0.1)
    assert lrs[79] == pytest.approx(0.1)
    assert lrs[80] == pytest.approx(0.01)
    assert lrs[99] == pytest.approx(0.01)


def test_cosine_falls_to_zero_at_the_end() -> None:
    schedule = ScheduleSpec(lr=1.0, iterations=50, warmup_iters=0, scheduler="cosine")
    assert lr_factor(0, schedule) == pytest.approx(1.0)
    assert lr_factor(25, schedule) == pytest.approx(0.5)
    assert lr_factor(49, schedule) < 0.01
    assert lr_factor(50, schedule) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(60, schedule) == pytest.approx(0.0, abs=1e-12)  # never rises again


def test_norm_and_bias_params_get_no_weight_decay() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model[3].weight.requires_grad_(False)  # frozen: must be left out entirely
    head = nn.Linear(4, 2)
    groups = param_groups([model, head, head], weight_decay=1e-4)

    by_name = {g["name"]: g for g in groups}
    decayed = {id(p) for p in by_name["decay"]["params"]}
    not_decayed = {id(p) for p in by_name["no_decay"]["params"]}
    assert decayed == {id(model[0].weight), id(head.weight)}
    assert not_decayed == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
        id(model[3].bias),
        id(head.bias),
    }
    assert by_name["no_decay"]["weight_decay"] == 0.0

    optimizer = build_optimizer(groups, ScheduleSpec(weight_decay=1e-4))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == 0.9


def test_adamw_and_empty_params() -> None:
    optimizer = build_optimizer(
        [nn.Parameter(torch.zeros(1))], ScheduleSpec(optimizer="adamw", lr=1e-3)
    )
    assert isinstance(optimizer, torch.optim.AdamW)
    with pytest.raises(ValueError, match="frozen"):
        build_optimizer(param_groups([nn.Identity()], 1e-4), ScheduleSpec())


def test_scheduler_state_round_trip_resumes_the_same_lrs() -> None:
    schedule = ScheduleSpec(lr=0.2, iterations=40, warmup_iters=5, scheduler="cosine")

    def fresh() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        torch.manual_seed(0)
        optimizer = build_optimizer(param_groups([nn.Linear(3, 3)], 1e-4), schedule)
        return optimizer, build_scheduler(optimizer, schedule)

    optimizer, scheduler = fresh()
    for _ in range(17):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"opt": optimizer.state_dict(), "sched": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_opt, resumed_sched = fresh()
    resumed_opt.load_state_dict(saved["opt"])
    resumed_sched.load_state_dict(saved["sched"])
    assert resumed_sched.get_last_lr() == scheduler.get_last_lr()
    for _ in range(5):
        for opt, sched in ((optimizer, scheduler), (resumed_opt, resumed_sched)):
            opt.step()
            sched.step()
        assert [g["lr"] for g in resumed_opt.param_groups] == [
            g["lr"] for g in optimizer.param_groups
        ]
    assert resumed_opt.param_groups[0]["lr"] == pytest.approx(0.2 * lr_factor(22, schedule))


def test_distillation_ramp_is_linear_then_full() -> None:
    from hmkd_core.engine.trainer import distill_ramp

    assert distill_ramp(0, 0) == 1.0
    assert [distill_ramp(i, 4) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("apart", [False, True])
def test_a_distiller_with_large_gradients_shrinks_the_student_step_only_when_clipped_jointly(
    apart: bool,
) -> None:
    student, distiller = nn.Linear(3, 3), nn.Linear(3, 3)
    frozen = nn.Linear(3, 3).requires_grad_(False)
    for p in student.parameters():
        p.grad = torch.full_like(p, 0.1)  # norm 0.4, under the clip
    for p in distiller.parameters():
        p.grad = torch.full_like(p, 100.0)
    groups = clip_groups([student, distiller, frozen], apart)
    assert groups[0][0] is student.weight and len(groups) == (2 if apart else 1)
    for group in groups:
        torch.nn.utils.clip_grad_norm_(group, 1.0)
    kept = torch.allclose(student.weight.grad, torch.full((3, 3), 0.1))
    assert kept == apart
    assert float(torch.nn.utils.get_total_norm([p.grad for p in distiller.parameters()])) <= 1.0001
