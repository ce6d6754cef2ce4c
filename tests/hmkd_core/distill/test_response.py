"""Response distillation: each term's formula, when it is on, and what it refuses."""

from __future__ import annotations

import pytest
import torch

from hmkd_core.distill import ResponseDistiller, class_score_kd
from hmkd_core.distill.response import (
    BOX_BETA,
    HeadOutputs,
    RoITargets,
    box_delta_kd,
    match_rois,
    objectness_kd,
)
from hmkd_core.models import build_detector
from hmkd_core.spec import ModelSpec


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
    rois = RoITargets(torch.zeros(6, dtype=torch.int64), torch.zeros(6, 4), 1.0)
    d = torch.zeros(6, 12)
    ResponseDistiller(0.5, 2.0)(_heads(s, d), _heads(t, d), rois)["loss_response"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_the_weight_multiplies_the_loss() -> None:
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    d = torch.zeros(4, 12)
    rois = RoITargets(torch.zeros(4, dtype=torch.int64), d[:, :4], 1.0)
    both = (_heads(s, d), _heads(t, d), rois)
    one = ResponseDistiller(1.0)(*both)["loss_response"]
    torch.testing.assert_close(ResponseDistiller(0.25)(*both)["loss_response"], 0.25 * one)


def test_no_rois_gives_a_zero_that_keeps_the_graph() -> None:
    s = torch.zeros(0, 3, requires_grad=True)
    loss = class_score_kd(s, torch.zeros(0, 3), 1.0)
    assert loss.item() == 0.0 and loss.requires_grad


def test_scores_of_different_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="same RoIs"):
        class_score_kd(torch.zeros(4, 3), torch.zeros(4, 5), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        ResponseDistiller(1.0, 0.0)


def _heads(logits: torch.Tensor, deltas: torch.Tensor, obj: list | None = None) -> HeadOutputs:
    return HeadOutputs(logits, deltas, obj)


def test_box_term_pulls_toward_the_teacher_only_where_the_teacher_is_nearer_the_truth() -> None:
    labels = torch.tensor([0, 1, 2, 1])  # RoI 0 is background: never pulled
    truth = torch.zeros(4, 4)
    student = torch.zeros(4, 3, 4)
    teacher = torch.zeros(4, 3, 4)
    student[1, 1] = 0.5  # the teacher (exact) is nearer the truth: pulled
    student[2, 2] = 0.05
    teacher[2, 2] = 0.3  # the teacher is farther: not pulled
    student[3, 1] = 1.0
    teacher[3, 1] = 0.4  # nearer, though not exact: pulled toward the teacher's 0.4
    student[0, 0] = 5.0  # background RoI, even where it differs
    loss = box_delta_kd(student.reshape(4, 12), teacher.reshape(4, 12), labels, truth)

    def smooth(d: float) -> float:
        return 0.5 * d * d / BOX_BETA if d < BOX_BETA else d - 0.5 * BOX_BETA

    expected = (4 * smooth(0.5) + 4 * smooth(0.6)) / 4  # over every RoI, as the detector's loss
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_box_term_is_zero_without_foreground_and_keeps_the_graph() -> None:
    s = torch.randn(3, 8, requires_grad=True)
    loss = box_delta_kd(s, torch.randn(3, 8), torch.zeros(3, dtype=torch.int64), torch.zeros(3, 4))
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="same RoIs"):
        box_delta_kd(torch.zeros(3, 8), torch.zeros(3, 12), torch.zeros(3), torch.zeros(3, 4))


def test_objectness_term_is_the_bernoulli_divergence_per_anchor() -> None:
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 2, 2, generator=g)]
    t = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 2, 2, generator=g)]
    expected = 0.0
    for a, b in zip(s, t, strict=True):
        p, q = torch.sigmoid(b), torch.sigmoid(a)
        expected += (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum()
    torch.testing.assert_close(objectness_kd(s, t, 512.0), expected / 512.0)
    assert objectness_kd(t, t, 1.0).abs() < 1e-5
    with pytest.raises(ValueError, match="same anchors"):
        objectness_kd(s, t[:1], 1.0)


def test_each_term_is_present_only_at_a_weight_above_zero() -> None:
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    d = torch.randn(4, 12)
    rois = RoITargets(torch.tensor([1, 0, 2, 1]), torch.zeros(4, 4), 8.0)
    obj = [torch.randn(1, 3, 2, 2)]
    both = (_heads(s, d, obj), _heads(t, d + 1, [o + 1 for o in obj]))
    assert set(ResponseDistiller(0.0, box_weight=1.0)(*both, rois)) == {"loss_response_box"}
    got = ResponseDistiller(1.0, objectness_weight=2.0)(*both, rois)
    assert set(got) == {"loss_response", "loss_response_objectness"}
    once = ResponseDistiller(0.0, objectness_weight=1.0)(*both, rois)["loss_response_objectness"]
    torch.testing.assert_close(got["loss_response_objectness"], 2.0 * once)
    with pytest.raises(ValueError, match="objectness maps"):
        ResponseDistiller(0.0, objectness_weight=1.0)(_heads(s, d), _heads(t, d), rois)
    with pytest.raises(ValueError, match="classes and deltas"):
        ResponseDistiller(0.0, box_weight=1.0)(*both, RoITargets(None, None, 8.0))


def test_rois_get_the_classes_and_deltas_the_detectors_own_heads_assign() -> None:
    heads = build_detector(ModelSpec(fpn_channels=16, min_size=64, max_size=64), 3).roi_heads
    g = torch.Generator().manual_seed(2)
    corners = torch.rand(40, 2, generator=g) * 40
    rois = [torch.cat([corners, corners + 4 + torch.rand(40, 2, generator=g) * 20], dim=1)]
    gt = torch.tensor([[4.0, 4.0, 20.0, 24.0], [30.0, 30.0, 60.0, 50.0]])
    rois[0] = torch.cat([rois[0], gt])  # the heads add the ground truth to the RoIs they sample
    targets = [{"boxes": gt, "labels": torch.tensor([1, 2])}]
    fg_iou = heads.proposal_matcher.high_threshold
    labels, deltas = match_rois(rois, targets, fg_iou, heads.box_coder)
    idx, theirs = heads.assign_targets_to_proposals(rois, [gt], [targets[0]["labels"]])
    torch.testing.assert_close(labels, theirs[0].clamp(min=0))
    assert (labels > 0).sum() >= 2  # the ground-truth boxes themselves at least
    fg = labels > 0
    expected = heads.box_coder.encode_single(gt[idx[0].clamp(min=0)], rois[0])
    torch.testing.assert_close(deltas[fg], expected[fg])
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    labels, deltas = match_rois(rois, empty, fg_iou, heads.box_coder)
    assert labels.eq(0).all() and deltas.shape == (len(rois[0]), 4)
