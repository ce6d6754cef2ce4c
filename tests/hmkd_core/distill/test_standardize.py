"""`distill.standardize`: both sides compared as per-image, per-channel standardized maps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from hmkd_core.distill import DistillInputs, build_distiller
from hmkd_core.distill.base import standardize
from hmkd_core.spec import DistillSpec

from .test_distillers import CONFIGS, LEVELS, build


def test_standardize_gives_each_image_channel_zero_mean_unit_variance() -> None:
    feat = 3.0 + 5.0 * torch.randn(2, 4, 6, 7)
    out = standardize(feat)
    flat = out.flatten(2)
    torch.testing.assert_close(flat.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.var(-1, unbiased=False), torch.ones(2, 4), atol=1e-3, rtol=0)
    # a constant channel has no pattern: it maps to zeros, not to NaN
    assert torch.equal(standardize(torch.full((1, 1, 3, 3), 2.0)), torch.zeros(1, 1, 3, 3))


def _rescaled_teacher(inputs: DistillInputs) -> DistillInputs:
    """Each image's channels scaled by a positive factor and shifted, differently per image."""
    teacher = {}
    for lv, t in inputs.teacher.items():
        b, c = t.shape[:2]
        scale = torch.rand(b, c, 1, 1) * 4.0 + 0.25
        shift = torch.randn(b, c, 1, 1) * 3.0
        teacher[lv] = t * scale + shift
    return replace(inputs, teacher=teacher)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_standardized_losses_ignore_the_teachers_channel_scales(config: str, make_inputs) -> None:
    inputs = make_inputs(16, 32)
    rescaled = _rescaled_teacher(inputs)
    for standardized in (True, False):
        torch.manual_seed(0)
        distiller = build(config, 16, 32, standardize=standardized)
        torch.manual_seed(1)  # MGD's masks: the same draws for both inputs
        want = distiller(inputs)
        torch.manual_seed(1)
        got = distiller(rescaled)
        total_want, total_got = sum(want.values()), sum(got.values())
        if standardized:
            for name in want:
                torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-3)
        else:  # the check can tell: the plain losses do move
            assert not torch.allclose(total_got, total_want, rtol=1e-2)


def test_standardized_mimic_is_the_mse_of_the_standardized_maps(make_inputs) -> None:
    inputs = make_inputs(16, 32)
    distiller = build("mimic", 16, 32, standardize=True)
    losses = distiller(inputs)
    for lv in LEVELS:
        conv = distiller.align[lv][0]
        student = conv(inputs.student[lv])
        want = F.mse_loss(standardize_reference(student), standardize_reference(inputs.teacher[lv]))
        torch.testing.assert_close(losses[f"loss_mimic_{lv}"], want)


def standardize_reference(x: torch.Tensor) -> torch.Tensor:
    """Per image and channel, written out position by position."""
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            v = x[i, c]
            out[i, c] = (v - v.mean()) / torch.sqrt(((v - v.mean()) ** 2).mean() + 1e-5)
    return out


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_standardized_methods_train_the_student_and_the_adapter(config: str, make_inputs) -> None:
    inputs = make_inputs(16, 32)
    for feat in inputs.student.values():
        feat.requires_grad_(True)
    distiller = build(config, 16, 32, standardize=True)
    sum(distiller(inputs).values()).backward()
    for lv in LEVELS:
        grad = inputs.student[lv].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, lv
        assert distiller.align[lv][0].weight.grad.abs().sum() > 0, lv


def test_hmkd_takes_no_composed_map_through_a_standardized_adapter() -> None:
    spec = DistillSpec.model_validate({**CONFIGS["hmkd"], "standardize": True})
    narrow = build_distiller(spec, levels=LEVELS, student_channels=8, teacher_channels=32)
    assert not narrow.compose_align
    plain = DistillSpec.model_validate(CONFIGS["hmkd"])
    assert build_distiller(
        plain, levels=LEVELS, student_channels=8, teacher_channels=32
    ).compose_align
