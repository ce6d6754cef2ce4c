"""Hierarchical matching: the invariant (D_l is made of student values), gradients, options."""

from __future__ import annotations

import pytest
import torch

from hmkd_core.distill import DistillInputs, HMKDDistiller
from hmkd_core.distill.hm import HierarchicalMatching, hm_weights, weighted_mse
from hmkd_core.distill.masks import level_masks
from hmkd_core.spec import FocalOptions, HMKDOptions, HMOptions

LEVELS = ("p2", "p3", "p4")


def hm_module(channels: int = 16, **kw) -> HierarchicalMatching:
    return HierarchicalMatching(LEVELS, channels, HMOptions(dim=16, heads=2, **kw))


def hm_only(**kw) -> HMKDOptions:
    hm = HMOptions(dim=16, heads=2, **kw)
    return HMKDOptions(hm=hm, sdm=FocalOptions(enabled=False), w_hm=1.0)


def losses_and_predictions(
    distiller: HMKDDistiller, inputs: DistillInputs, query: str = "teacher"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The distiller's losses, and HM's predictions recomputed from the same inputs, with the
    query read from the teacher or from the aligned student."""
    losses = distiller(inputs)
    aligned = {lv: distiller.align[lv](s) for lv, s in inputs.student.items()}
    preds = distiller.hm.decode(aligned, inputs.teacher if query == "teacher" else aligned)
    return losses, preds


@torch.no_grad()
def test_zero_student_gives_constant_prediction_for_any_teacher(make_features) -> None:
    hm = hm_module()
    zeros = {lv: torch.zeros_like(t) for lv, t in make_features(2, 16).items()}
    first = hm.decode(zeros, make_features(2, 16))
    second = hm.decode(zeros, {lv: 5 * t + 1 for lv, t in make_features(2, 16).items()})
    for lv in LEVELS:
        pred = first[lv]
        assert torch.allclose(pred, pred[:, :, :1, :1].expand_as(pred), atol=1e-5), lv
        assert torch.allclose(pred, second[lv], atol=1e-5), lv


@torch.no_grad()
def test_zero_student_features_through_the_adapter_give_a_constant(make_features) -> None:
    distiller = HMKDDistiller(LEVELS, student_channels=8, teacher_channels=16, opts=hm_only())
    student = {lv: torch.zeros_like(s) for lv, s in make_features(2, 8).items()}
    aligned = {lv: distiller.align[lv](s) for lv, s in student.items()}
    preds = distiller.hm.decode(aligned, make_features(2, 16))
    for pred in preds.values():
        assert torch.allclose(pred, pred[:, :, :1, :1].expand_as(pred), atol=1e-5)


@torch.no_grad()
def test_teacher_acts_only_through_attention_weights(make_features) -> None:
    student = make_features(2, 16)
    teacher_a, teacher_b = make_features(2, 16), make_features(2, 16)
    # window 1: one value per position, attention weights are all 1 -> teacher has no effect.
    local = hm_module(window=1)
    a, b = local.decode(student, teacher_a), local.decode(student, teacher_b)
    for lv in LEVELS:
        assert torch.equal(a[lv], b[lv])
    # window 3: the teacher's query does choose among the student's values.
    wide = hm_module(window=3)
    a, b = wide.decode(student, teacher_a), wide.decode(student, teacher_b)
    assert not torch.allclose(a["p2"], b["p2"])


def test_gradients_reach_student_and_hm_but_not_teacher(make_inputs) -> None:
    inputs = make_inputs(student_channels=8, teacher_channels=16)
    for feat in inputs.student.values():
        feat.requires_grad_(True)
    leaky = inputs.teacher["p3"].requires_grad_(True)  # as if a caller forgot no_grad
    distiller = HMKDDistiller(LEVELS, student_channels=8, teacher_channels=16, opts=hm_only())
    losses = distiller(inputs)
    assert sorted(losses) == ["loss_hm_p2", "loss_hm_p3", "loss_hm_p4"]
    sum(losses.values()).backward()
    for lv, feat in inputs.student.items():
        assert feat.grad is not None and feat.grad.abs().sum() > 0, lv
    for name, param in distiller.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert leaky.grad is None
    for lv, feat in inputs.teacher.items():
        assert feat.grad is None, lv


def test_query_source_student_reads_the_aligned_student(make_inputs) -> None:
    inputs = make_inputs(student_channels=8, teacher_channels=16)
    distiller = HMKDDistiller(
        LEVELS, student_channels=8, teacher_channels=16, opts=hm_only(query_source="student")
    )
    losses, preds = losses_and_predictions(distiller, inputs, query="student")
    masks = level_masks(inputs.boxes, inputs.teacher, LEVELS)
    for lv in LEVELS:
        expected = weighted_mse(preds[lv], inputs.teacher[lv], hm_weights(*masks[lv], 0.5))
        assert torch.allclose(losses[f"loss_hm_{lv}"], expected)
        assert torch.isfinite(losses[f"loss_hm_{lv}"])


def test_weighted_mse_and_weights_by_hand() -> None:
    fg = torch.tensor([[[[1.0, 0.0]]]])
    weight = torch.tensor([[[[0.25, 0.5]]]])
    assert torch.equal(hm_weights(fg, weight, 0.5), torch.tensor([[[[0.25, 0.25]]]]))
    pred = torch.zeros(2, 3, 1, 2)
    target = torch.ones(2, 3, 1, 2)
    w = torch.tensor([1.0, 2.0]).reshape(1, 1, 1, 2).expand(2, 1, 1, 2)
    assert weighted_mse(pred, target, w) == pytest.approx(3 * 3.0)  # (3*1 + 3*2) per image


def test_level_weights_scale_each_level(make_inputs) -> None:
    inputs = make_inputs(student_channels=16, teacher_channels=16)
    torch.manual_seed(1)
    plain = HMKDDistiller(LEVELS, student_channels=16, teacher_channels=16, opts=hm_only())
    torch.manual_seed(1)
    weights = {"p2": 2.0, "p3": 0.0, "p4": 1.0}
    weighted = HMKDDistiller(
        LEVELS, student_channels=16, teacher_channels=16, opts=hm_only(level_weights=weights)
    )
    a, b = plain(inputs), weighted(inputs)
    assert torch.allclose(b["loss_hm_p2"], 2 * a["loss_hm_p2"])
    assert b["loss_hm_p3"] == 0
    assert torch.allclose(b["loss_hm_p4"], a["loss_hm_p4"])


def test_odd_grids_and_other_level_sets(make_features) -> None:
    sizes = {"p3": (15, 15), "p4": (8, 8), "p5": (3, 3)}  # ceil and floor halving both occur
    hm = HierarchicalMatching(("p5", "p3", "p4"), 16, HMOptions(dim=16, heads=2))
    feats = make_features(1, 16, sizes)
    preds = hm.decode(feats, feats)
    assert {lv: tuple(p.shape[-2:]) for lv, p in preds.items()} == sizes


def test_refuses_gaps_and_stray_level_weights() -> None:
    with pytest.raises(ValueError, match="consecutive"):
        HierarchicalMatching(("p2", "p4"), 16, HMOptions(dim=16, heads=2))
    with pytest.raises(ValueError, match="not distilled"):
        HierarchicalMatching(
            ("p3", "p4", "p5"), 16, HMOptions(dim=16, heads=2, level_weights={"p2": 3.0})
        )
    # The default weights name p2..p4; a p3..p5 detector keeps them without complaint.
    HierarchicalMatching(("p3", "p4", "p5"), 16, HMOptions(dim=16, heads=2))


def test_inputs_are_checked_by_level(make_features) -> None:
    distiller = HMKDDistiller(LEVELS, student_channels=8, teacher_channels=16, opts=hm_only())
    student = make_features(2, 8)
    del student["p4"]
    with pytest.raises(KeyError, match="p4"):
        distiller(DistillInputs(student, make_features(2, 16), [torch.zeros(0, 4)] * 2, (128, 128)))


def test_composed_adapter_gives_the_same_predictions_and_gradients(make_features) -> None:
    # A 8-channel student aligned to 16 teacher channels: HMKD computes K/V through the
    # composed map Wkv . Align; it must be the same function of the same parameters.
    distiller = HMKDDistiller(LEVELS, student_channels=8, teacher_channels=16, opts=hm_only())
    assert distiller.compose_align
    student, teacher = make_features(2, 8), make_features(2, 16)
    results = []
    for composed in (False, True):
        distiller.zero_grad()
        aligned = {lv: distiller.align[lv](s) for lv, s in student.items()}
        raw = {lv: (student[lv], distiller.align[lv]) for lv in LEVELS} if composed else None
        preds = distiller.hm.decode(aligned, teacher, raw)
        sum(p.square().sum() for p in preds.values()).backward()
        grads = {n: p.grad.clone() for n, p in distiller.named_parameters()}
        results.append((preds, grads))
    (plain, plain_grads), (composed, composed_grads) = results
    for lv in LEVELS:
        assert torch.allclose(plain[lv], composed[lv], atol=1e-5), lv
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, composed_grads[name], rtol=1e-4, atol=1e-4), name


DEEP_SIZES = {"p2": (32, 32), "p3": (16, 16), "p4": (8, 8), "p5": (4, 4), "p6": (2, 2)}


@torch.no_grad()
def test_deep_query_reads_only_levels_coarser_than_the_distilled_ones(make_features) -> None:
    hm = hm_module(query_levels="deep")
    assert hm.query_levels == ("p5", "p6")
    student = make_features(2, 16)
    teacher = make_features(2, 16, DEEP_SIZES)
    base = hm.decode(student, teacher)
    # the distilled levels' own teacher features do not reach the prediction at all
    other = {**teacher, **{lv: torch.randn_like(teacher[lv]) for lv in LEVELS}}
    for lv, pred in hm.decode(student, other).items():
        assert torch.equal(pred, base[lv]), lv
    # the deep ones steer the attention
    deeper = {**teacher, "p5": torch.randn_like(teacher["p5"])}
    assert not torch.allclose(hm.decode(student, deeper)["p2"], base["p2"])


def test_deep_query_names_the_missing_teacher_levels(make_features) -> None:
    hm = hm_module(query_levels="deep")
    with pytest.raises(KeyError, match=r"'p5', 'p6'.*query_levels: distilled"):
        hm.decode(make_features(2, 16), make_features(2, 16))


def test_deep_query_with_a_student_query_is_refused() -> None:
    with pytest.raises(ValueError, match="needs query_source teacher"):
        HMOptions(query_source="student", query_levels="deep")


def test_hmkd_distiller_with_deep_query_trains_through_the_adapters(make_features) -> None:
    opts = hm_only(query_levels="deep")
    distiller = HMKDDistiller(LEVELS, student_channels=8, teacher_channels=16, opts=opts)
    student = {lv: s.requires_grad_() for lv, s in make_features(2, 8).items()}
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 40.0]]), torch.zeros(0, 4)]
    inputs = DistillInputs(student, make_features(2, 16, DEEP_SIZES), boxes, (128, 128))
    losses = distiller(inputs)
    sum(losses.values()).backward()
    assert set(losses) == {f"loss_hm_{lv}" for lv in LEVELS}
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student.values())
    assert distiller.hm.encoder.lateral["p5"].weight.grad is not None


@torch.no_grad()
def test_generator_and_mask_keep_the_teacher_out_of_the_prediction(make_features) -> None:
    hm = hm_module(generator=True, mask_ratio=0.45)
    zeros = {lv: torch.zeros_like(t) for lv, t in make_features(2, 16).items()}
    torch.manual_seed(0)
    first = hm.decode(zeros, make_features(2, 16))
    torch.manual_seed(0)
    second = hm.decode(zeros, {lv: 5 * t + 1 for lv, t in make_features(2, 16).items()})
    for lv in LEVELS:
        assert torch.allclose(first[lv], second[lv], atol=1e-5), lv


@torch.no_grad()
def test_generator_maps_the_linear_prediction(make_features) -> None:
    student, teacher = make_features(2, 16), make_features(2, 16)
    plain, generative = hm_module(), hm_module(generator=True)
    missing, _ = generative.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(".generate." in key for key in missing)
    linear, generated = plain.decode(student, teacher), generative.decode(student, teacher)
    for lv in LEVELS:
        expected = generative.decoder[lv].generate(linear[lv])
        assert torch.allclose(generated[lv], expected, atol=1e-5), lv


@torch.no_grad()
@pytest.mark.parametrize("kernel", [1, 3])
def test_generator_kernel_is_its_reach_over_the_grid(kernel: int) -> None:
    # a change at one cell of the decoded map reaches the cells within the generator's two
    # convs: that cell alone for 1x1, its 5x5 neighbourhood for 3x3
    generate = hm_module(generator=True, generator_kernel=kernel).decoder["p2"].generate
    torch.manual_seed(0)
    linear = torch.randn(1, generate[0].in_channels, 12, 12)
    poked = linear.clone()
    poked[0, :, 6, 6] += 1.0
    moved = (generate(poked) - generate(linear)).abs().amax(dim=(0, 1)) > 0
    reach = kernel - 1  # two convs of radius kernel // 2
    expected = torch.zeros(12, 12, dtype=torch.bool)
    expected[6 - reach : 7 + reach, 6 - reach : 7 + reach] = True
    assert torch.equal(moved, expected)


@torch.no_grad()
def test_mask_ratio_hides_that_share_of_the_student_positions(make_features) -> None:
    # window 1, no generator: a masked position predicts what an all-zero student gives
    hm = hm_module(window=1, mask_ratio=0.3)
    student = make_features(4, 16, sizes={"p2": (32, 32), "p3": (16, 16), "p4": (8, 8)})
    teacher = make_features(4, 16, sizes={"p2": (32, 32), "p3": (16, 16), "p4": (8, 8)})
    torch.manual_seed(0)
    preds = hm.decode(student, teacher)
    zero = hm.decode({lv: torch.zeros_like(s) for lv, s in student.items()}, teacher)
    p2 = preds["p2"]
    hidden = torch.isclose(p2, zero["p2"], atol=1e-6).all(dim=1)
    assert 0.25 < hidden.float().mean().item() < 0.35
    unmasked = hm_module(window=1).decode(student, teacher)["p2"]
    assert not torch.isclose(unmasked, zero["p2"], atol=1e-6).all(dim=1).any()


def test_masking_skips_the_composed_adapter_and_still_trains_it(make_inputs) -> None:
    inputs = make_inputs(student_channels=8, teacher_channels=16)
    distiller = HMKDDistiller(
        LEVELS, student_channels=8, teacher_channels=16, opts=hm_only(mask_ratio=0.45)
    )
    assert distiller.compose_align
    sum(distiller(inputs).values()).backward()
    for name, param in distiller.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_uniform_cell_weights_are_the_plain_sum(make_inputs) -> None:
    inputs = make_inputs(student_channels=16, teacher_channels=16)
    distiller = HMKDDistiller(
        LEVELS, student_channels=16, teacher_channels=16, opts=hm_only(cell_weights="uniform")
    )
    losses, preds = losses_and_predictions(distiller, inputs)
    for lv in LEVELS:
        expected = (preds[lv] - inputs.teacher[lv]).pow(2).sum() / 2
        assert torch.allclose(losses[f"loss_hm_{lv}"], expected, rtol=1e-5), lv


def test_mask_ratio_of_one_is_refused() -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        HMOptions(mask_ratio=1.0)


def level_query(hm: HierarchicalMatching, student, teacher, level: str) -> torch.Tensor:
    """The query one decoder level receives, captured by a forward pre-hook."""
    seen: list[torch.Tensor] = []
    handle = hm.decoder[level].register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        hm.decode(student, teacher)
    finally:
        handle.remove()
    return seen[0]


def is_constant_per_image(x: torch.Tensor) -> bool:
    return torch.allclose(x, x[:, :, :1, :1].expand_as(x))


@torch.no_grad()
def test_image_pooled_query_keeps_what_but_not_where(make_features) -> None:
    student, teacher = make_features(2, 16), make_features(2, 16)
    pooled = hm_module(query_pool="image")
    query = level_query(pooled, student, teacher, "p4")
    assert is_constant_per_image(query)
    assert not torch.allclose(query[0], query[1])  # each image keeps its own
    assert not is_constant_per_image(level_query(hm_module(), student, teacher, "p4"))
    # finer levels get GroupNorm(query + proj(attended)): the student's values vary per cell
    assert not is_constant_per_image(level_query(pooled, student, teacher, "p3"))


def test_image_pooled_query_still_trains_the_encoder(make_inputs) -> None:
    inputs = make_inputs(student_channels=8, teacher_channels=16)
    distiller = HMKDDistiller(
        LEVELS, student_channels=8, teacher_channels=16, opts=hm_only(query_pool="image")
    )
    sum(distiller(inputs).values()).backward()
    for name, param in distiller.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert distiller.hm.encoder.head[0].weight.grad.abs().sum() > 0


def test_value_grad_own_reaches_every_level_and_still_trains(make_inputs) -> None:
    inputs = make_inputs(student_channels=8, teacher_channels=16)
    distiller = HMKDDistiller(
        LEVELS, student_channels=8, teacher_channels=16, opts=hm_only(value_grad="own")
    )
    assert all(level.attend.own_value_grad for level in distiller.hm.decoder.values())
    sum(distiller(inputs).values()).backward()
    for name, param in distiller.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
