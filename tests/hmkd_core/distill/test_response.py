"""Class-score distillation: the formula, its temperature, and what it refuses."""

from __future__ import annotations

import pytest
import torch

from hmkd_core.distill import ResponseDistiller, class_score_kd


def _reference(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    """KL(p_t || p_s) per RoI, averaged over RoIs, times T^2, written out term by term."""
    p_t = torch.softmax(t / temp, dim=1)
    log_p_t = torch.log_softmax(t / temp, dim=1)
    log_p_s = torch.log_softmax(s / temp, dim=1)
    return (p_t * (log_p_t - log_p_s)).sum(dim=1).mean() * temp**2


@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_matches_the_written_out_divergence(temp: float) -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    torch.testing.assert_close(class_score_kd(s, t, temp), _reference(s, t, temp))


def test_zero_only_where_the_scores_agree_up_to_a_shift() -> None:
    t = torch.randn(5, 3)
    assert class_score_kd(t + 2.0, t, 1.0).abs() < 1e-6  # a softmax ignores a constant shift
    assert class_score_kd(t.flip(1), t, 1.0) > 1e-3


def test_the_gradient_reaches_the_student_and_never_the_teacher() -> None:
    s = torch.randn(6, 3, requires_grad=True)
    t = torch.randn(6, 3, requires_grad=True)
    ResponseDistiller(0.5, 2.0)(s, t)["loss_response"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_the_weight_multiplies_the_loss() -> None:
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    one = ResponseDistiller(1.0)(s, t)["loss_response"]
    torch.testing.assert_close(ResponseDistiller(0.25)(s, t)["loss_response"], 0.25 * one)


def test_no_rois_gives_a_zero_that_keeps_the_graph() -> None:
    s = torch.zeros(0, 3, requires_grad=True)
    loss = class_score_kd(s, torch.zeros(0, 3), 1.0)
    assert loss.item() == 0.0 and loss.requires_grad


def test_scores_of_different_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="same RoIs"):
        class_score_kd(torch.zeros(4, 3), torch.zeros(4, 5), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        ResponseDistiller(1.0, 0.0)
