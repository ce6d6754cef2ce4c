"""Every method through the registry: named finite losses, learnability, channel mismatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hmkd_core.distill import DISTILLERS, DistillInputs, NoDistiller, build_distiller
from hmkd_core.spec import DistillSpec

LEVELS = ("p2", "p3", "p4")
SMALL_HM = {"dim": 16, "heads": 2}

# Unit method weights: the defaults are calibrated for real FPN magnitudes, and on these small
# hand-made features they would shrink gradients to the size of Adam's epsilon.
CONFIGS: dict[str, dict] = {
    "mimic": {"method": "mimic", "mimic": {"weight": 1.0}},
    "fgd": {"method": "fgd", "fgd": {"weight": 1.0}},
    "mgd": {"method": "mgd", "mgd": {"weight": 1.0}},
    "hmkd": {"method": "hmkd", "hmkd": {"hm": SMALL_HM}},
    "hmkd_no_sdm": {"method": "hmkd", "hmkd": {"hm": SMALL_HM, "sdm": {"enabled": False}}},
    "hmkd_no_hm": {"method": "hmkd", "hmkd": {"hm": {**SMALL_HM, "enabled": False}}},
    "hmkd_student_query": {
        "method": "hmkd",
        "hmkd": {"hm": {**SMALL_HM, "query_source": "student"}},
    },
}


def names(*patterns: str) -> set[str]:
    return {p.format(lv=lv) for p in patterns for lv in LEVELS}


EXPECTED = {
    "mimic": names("loss_mimic_{lv}"),
    "fgd": names(
        "loss_fgd_fg_{lv}", "loss_fgd_bg_{lv}", "loss_fgd_att_{lv}", "loss_fgd_global_{lv}"
    ),
    "mgd": names("loss_mgd_{lv}"),
    "hmkd": names("loss_hm_{lv}", "loss_sdm_fg_{lv}", "loss_sdm_bg_{lv}", "loss_sdm_att_{lv}"),
    "hmkd_no_sdm": names("loss_hm_{lv}"),
    "hmkd_no_hm": names("loss_sdm_fg_{lv}", "loss_sdm_bg_{lv}", "loss_sdm_att_{lv}"),
    "hmkd_student_query": names(
        "loss_hm_{lv}", "loss_sdm_fg_{lv}", "loss_sdm_bg_{lv}", "loss_sdm_att_{lv}"
    ),
}


def build(config: str, student_channels: int, teacher_channels: int, **extra):
    spec = DistillSpec.model_validate({**CONFIGS[config], **extra})
    return build_distiller(
        spec, levels=LEVELS, student_channels=student_channels, teacher_channels=teacher_channels
    )


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("channels", [(32, 32), (32, 64)], ids=["same", "mismatched"])
def test_losses_are_named_and_finite(config: str, channels, make_inputs) -> None:
    student_channels, teacher_channels = channels
    distiller = build(config, student_channels, teacher_channels)
    losses = distiller(make_inputs(student_channels, teacher_channels))
    assert set(losses) == EXPECTED[config]
    for name, loss in losses.items():
        assert loss.ndim == 0 and torch.isfinite(loss), name


def smooth_teacher(
    like: dict[str, torch.Tensor], channels: int, latent: int = 8
) -> dict[str, torch.Tensor]:
    """Spatially smooth, low-rank maps like real FPN features (i.i.d. noise cannot be inpainted,
    nor matched through a 16-channel student): a few 4x4 latents upsampled and mixed."""
    z = torch.randn(next(iter(like.values())).shape[0], latent, 4, 4)
    mix = torch.randn(channels, latent) / latent**0.5
    return {
        lv: torch.einsum("cl,blhw->bchw", mix, F.interpolate(z, size=f.shape[-2:], mode="bilinear"))
        for lv, f in like.items()
    }


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_optimising_the_student_lowers_the_loss(config: str, make_inputs) -> None:
    inputs = make_inputs(student_channels=16, teacher_channels=32)
    teacher = smooth_teacher(inputs.teacher, 32)
    student = {lv: torch.nn.Parameter(0.1 * s) for lv, s in inputs.student.items()}
    distiller = build(config, 16, 32)
    params = [*student.values(), *distiller.parameters()]
    optimiser = torch.optim.Adam(params, lr=0.01)
    history = []
    for _ in range(60):
        step = DistillInputs(student, teacher, inputs.boxes, inputs.image_size)
        total = sum(distiller(step).values())
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        history.append(total.item())
    first, last = history[0], sum(history[-5:]) / 5
    assert last < 0.35 * first, f"{config}: {first:.4g} -> {last:.4g}"


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_whole_loss_weight_is_applied_once(config: str, make_inputs) -> None:
    inputs = make_inputs()
    results = []
    for weight in (1.0, 3.0):
        torch.manual_seed(7)  # same parameters and, for mgd, the same random mask
        distiller = build(config, 32, 32, weight=weight)
        results.append(distiller(inputs))
    for name, loss in results[0].items():
        assert torch.allclose(results[1][name], 3.0 * loss, rtol=1e-5), name


def test_none_returns_no_losses(make_inputs) -> None:
    distiller = build_distiller(
        DistillSpec(method="none"), levels=LEVELS, student_channels=32, teacher_channels=64
    )
    assert isinstance(distiller, NoDistiller)
    assert distiller(make_inputs(32, 64)) == {}
    assert not list(distiller.parameters())


def test_registry_names_every_method() -> None:
    assert set(DISTILLERS) == {"none", "mimic", "fgd", "mgd", "hmkd"}


def test_teacher_gets_no_gradient_whatever_the_method(make_inputs) -> None:
    inputs = make_inputs(16, 32)
    for feat in inputs.teacher.values():
        feat.requires_grad_(True)
    for config in CONFIGS:
        sum(build(config, 16, 32)(inputs).values()).backward()
    assert all(feat.grad is None for feat in inputs.teacher.values())


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_level_weights_multiply_each_level_of_every_method(config: str, make_inputs) -> None:
    inputs = make_inputs(16, 32)
    weights = {"p2": 3.0, "p3": 0.0}  # p4 not named: kept at 1
    torch.manual_seed(1)
    plain = build(config, 16, 32)
    torch.manual_seed(1)
    weighted = build(config, 16, 32, level_weights=weights)
    assert weighted.state_dict().keys() == plain.state_dict().keys()
    for a, b in zip(plain.state_dict().values(), weighted.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)  # the same distiller; only the multipliers differ
    # the same random draws (MGD's masks) on both sides
    torch.manual_seed(2)
    want = plain(inputs)
    torch.manual_seed(2)
    got = weighted(inputs)
    assert set(got) == set(want)
    for name, loss in want.items():
        factor = weights.get(name.rsplit("_", 1)[-1], 1.0)
        torch.testing.assert_close(got[name], factor * loss, msg=name)


def test_level_weights_for_a_level_not_distilled_are_refused() -> None:
    spec = DistillSpec.model_validate({**CONFIGS["mimic"], "level_weights": {"p5": 2.0}})
    with pytest.raises(ValueError, match=r"distill\.level_weights: level\(s\) \['p5'\] are not"):
        build_distiller(spec, levels=LEVELS, student_channels=8, teacher_channels=8)
    # a weight of 1 for a level not distilled changes nothing, so it is let through
    spec = DistillSpec.model_validate({**CONFIGS["mimic"], "level_weights": {"p5": 1.0}})
    build_distiller(spec, levels=LEVELS, student_channels=8, teacher_channels=8)
