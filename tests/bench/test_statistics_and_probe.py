"""Paired intervals, the held-out tuning split, and the probe behind diagnose and calibrate."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.calibrate import TOLERANCE, per_level
from bench.data import hold_out
from bench.presets import PRESETS
from bench.probe import format_probe, probe
from bench.stats import paired
from tests.conftest import tiny_model, tiny_spec, tiny_spec_dict


def test_paired_interval_is_the_t_interval_of_the_differences() -> None:
    p = paired([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sd sqrt(2.5), t(0.975, 4) = 2.7764: half width 2.7764 * 1.5811 / sqrt(5)
    assert p.mean == pytest.approx(3.0)
    assert p.hi - p.mean == pytest.approx(1.9632, abs=1e-3)
    assert p.lo == pytest.approx(3.0 - 1.9632, abs=1e-3)
    assert not p.within_noise
    assert paired([-1.0, 2.0, 0.5]).within_noise
    one = paired([0.7])
    assert one.lo is None and one.within_noise
    with pytest.raises(ValueError):
        paired([])


def test_hold_out_takes_images_spread_over_the_ids_with_their_boxes() -> None:
    coco = {
        "images": [{"id": i} for i in range(20, 0, -1)],
        "annotations": [{"id": 100 + i, "image_id": i} for i in range(1, 21)],
        "categories": [{"id": 1, "name": "x"}],
    }
    kept, held = hold_out(coco, 5)
    held_ids = [im["id"] for im in held["images"]]
    assert held_ids == [1, 5, 9, 13, 17]
    assert {a["image_id"] for a in held["annotations"]} == set(held_ids)
    assert len(kept["images"]) == 15 and not set(held_ids) & {im["id"] for im in kept["images"]}
    assert kept["categories"] == held["categories"] == coco["categories"]
    with pytest.raises(ValueError, match="out of range"):
        hold_out(coco, 20)


@pytest.mark.slow
def test_probe_gradient_ratio_scales_with_the_weight_so_calibration_hits_its_target(
    tiny_digits: dict[str, Path], tiny_teacher: Path
) -> None:
    teacher = tiny_model(backbone="resnet34", fpn_channels=32, weights=str(tiny_teacher))
    spec = tiny_spec(tiny_digits, teacher=teacher, distill={"method": "hmkd"})
    first = probe(spec, batches=2)
    assert set(first["levels"]) == {"p2", "p3", "p4"}
    for stats in first["levels"].values():
        assert stats["teacher_rms"] > 0 and stats["grad_det"] > 0 and stats["grad_kd"] > 0
        assert stats["att_effective_cells"] >= 1.0
        assert 0.0 <= stats["att_fg_mass"] <= 1.0
    assert {"hm_p2", "sdm_fg_p2", "sdm_bg_p4", "sdm_att_p3"} <= set(first["terms"])
    assert set(first["pull"]) == {"hm", "sdm_fg", "sdm_bg", "sdm_att"}
    assert all(v > 0 for v in first["pull"].values())
    # the kinds' gradients add up to the total's, so their norms can't sum to less
    assert sum(first["pull"].values()) >= first["grad_ratio"] * (1 - 1e-6)
    # calibrate's rule: the distillation gradient is linear in the weight
    target = 0.5
    factor = target / first["grad_ratio"]
    spec.distill.weight = factor
    second = probe(spec, batches=2)
    assert second["grad_ratio"] == pytest.approx(target, rel=1e-3)
    for kind, value in first["pull"].items():
        assert second["pull"][kind] == pytest.approx(factor * value, rel=1e-3)
    raw = first["terms"]["hm_p2"]["raw"]
    assert second["terms"]["hm_p2"]["raw"] == pytest.approx(raw, rel=1e-4)
    text = format_probe("hmkd", second)
    assert "p2" in text and "ratio" in text and "clipping fired" in text
    assert "by kind of term: hm " in text
    # one kind of term: its pull is the total, measured alike
    spec.distill.hmkd.sdm.enabled = False
    alone = probe(spec, batches=2)
    assert set(alone["pull"]) == {"hm"}
    assert alone["pull"]["hm"] == pytest.approx(alone["grad_ratio"], rel=1e-9)


@pytest.mark.slow
def test_probe_measures_the_class_score_term_beside_the_method_on_its_own_weight(
    tiny_digits: dict[str, Path], tiny_teacher: Path
) -> None:
    # the response term reaches the FPN maps through the box head's RoI pooling, so its pull
    # is measured on the same footing as a feature term's, and calibrated like one
    teacher = tiny_model(backbone="resnet34", fpn_channels=32, weights=str(tiny_teacher))
    distill = {"method": "mimic", "response": {"weight": 1.0, "temperature": 2.0}}
    spec = tiny_spec(tiny_digits, teacher=teacher, distill=distill)
    first = probe(spec, batches=2)
    assert first["pull"]["response"] > 0 and "mimic" in first["pull"]
    spec.distill.response.weight = 3.0
    spec.distill.weight = 0.5  # the method's multiplier does not scale the response term
    second = probe(spec, batches=2)
    assert second["pull"]["response"] == pytest.approx(3.0 * first["pull"]["response"], rel=1e-3)
    assert second["pull"]["mimic"] == pytest.approx(0.5 * first["pull"]["mimic"], rel=1e-3)
    raw = first["terms"]["response"]["raw"]
    assert raw > 0 and second["terms"]["response"]["raw"] == pytest.approx(raw, rel=1e-4)
    # the box and objectness terms are measured the same way, each under its own name
    spec.distill.response.box_weight = 1.0
    spec.distill.response.objectness_weight = 2.0
    third = probe(spec, batches=2)
    assert third["pull"]["response_objectness"] > 0
    assert third["pull"]["response_box"] >= 0  # 0 where the teacher regresses no RoI better
    assert third["terms"]["response_objectness"]["raw"] == pytest.approx(
        third["terms"]["response_objectness"]["weighted"] / 2.0
    )


@pytest.mark.slow
def test_probe_reports_what_a_shared_clip_takes_from_the_students_gradient(
    tiny_digits: dict[str, Path], tiny_teacher: Path
) -> None:
    teacher = tiny_model(backbone="resnet34", fpn_channels=32, weights=str(tiny_teacher))
    spec = tiny_spec(tiny_digits, teacher=teacher, distill={"method": "hmkd", "weight": 10.0})
    spec.schedule.clip_grad_norm = 1e-3  # below any real norm: every batch is clipped
    shared = probe(spec, batches=1)
    assert shared["clip_fraction"] == 1.0
    share = shared["distiller_norm_share"]
    assert 0.0 < share < 1.0
    assert "‖g_distiller‖ / ‖g‖" in format_probe("hmkd", shared)
    spec.distill.clip_apart = True  # the student's group then holds no distiller parameter
    apart = probe(spec, batches=1)
    assert apart["distiller_norm_share"] == 0.0
    # one batch, both clipped: the shared norm is the student's own norm grown by the
    # distiller's, so the two factors differ by exactly the student's part of that norm
    expected = apart["clip_scale"] * (1.0 - share**2) ** 0.5
    assert shared["clip_scale"] == pytest.approx(expected, rel=1e-4)


def test_a_raw_term_divides_out_exactly_the_factors_its_distiller_applied() -> None:
    from types import SimpleNamespace

    from bench.probe import method_weight
    from hmkd_core.spec import DistillSpec

    fgd = DistillSpec(method="fgd", weight=2.0)
    spec = SimpleNamespace(distill=fgd)
    assert method_weight(spec, "fgd_fg_p2") == pytest.approx(2.0 * fgd.fgd.weight)
    assert method_weight(spec, "fgd_global_p3") == pytest.approx(
        2.0 * fgd.fgd.weight * fgd.fgd.global_weight
    )
    hmkd = SimpleNamespace(distill=DistillSpec(method="hmkd"))
    assert method_weight(hmkd, "hm_p2") == pytest.approx(hmkd.distill.hmkd.w_hm)
    assert method_weight(hmkd, "sdm_bg_p4") == pytest.approx(hmkd.distill.hmkd.w_sdm)


def test_a_terms_kind_is_its_name_without_the_level() -> None:
    from bench.probe import term_kind

    levels = ("p2", "p3", "p4")
    assert term_kind("loss_hm_p2", levels) == "hm"
    assert term_kind("loss_sdm_fg_p4", levels) == "sdm_fg"
    assert term_kind("loss_fgd_global_p3", levels) == "fgd_global"
    assert term_kind("loss_mgd_p5", levels) == "mgd_p5"  # p5 is not distilled here
    assert term_kind("loss_total", levels) == "total"


def test_an_option_added_later_keeps_earlier_records_valid_at_its_default() -> None:
    from bench.records import spec_hash

    roots = {"work": Path("/w")}
    paths = {
        k: Path(f"/w/{k}")
        for k in ("train_images", "train_annotations", "val_images", "val_annotations")
    }
    spec = tiny_spec_dict(paths, distill={"method": "mimic"})
    spec["teacher"] = {**spec["student"], "weights": "/w/t.pt"}
    spec["schedule"]["iterations"] = 10
    h = spec_hash(spec, roots)
    spec["distill"]["align_iters"] = 0  # said explicitly: the same experiment
    assert spec_hash(spec, roots) == h
    spec["distill"]["align_iters"] = 3
    assert spec_hash(spec, roots) != h
    spec["distill"]["align_iters"] = 0
    spec["distill"]["warmup_iters"] = 3  # any other option still counts
    assert spec_hash(spec, roots) != h


def test_a_variant_is_also_paired_with_its_own_method() -> None:
    from bench import report

    def rec(ap_s: float) -> dict:
        return {"metrics": {"AP_S": ap_s}, "tune_metrics": {"AP_S": ap_s / 2}}

    rows = {
        "none": {s: rec(0.30 + s / 100) for s in range(3)},
        "hmkd": {s: rec(0.28 + s / 100) for s in range(3)},
        "hmkd: aligned": {s: rec(0.29 + s / 100 + (s - 1) / 1000) for s in range(3)},
        "mgd: aligned": {s: rec(0.25) for s in range(3)},  # its method has no row: left out
    }
    lines = report._variant_table({"rows": rows})
    assert len(lines) == 3 and lines[2].startswith("| hmkd: aligned | hmkd | +1.00 [")
    assert "better" in lines[2]
    assert report._variant_table({"rows": {"none": rows["none"]}}) == []


def test_rows_are_paired_at_every_evaluation_along_the_run() -> None:
    from bench import report

    def rec(curve: list[float]) -> dict:
        iters = [200 * (k + 1) for k in range(len(curve))]
        curves = {"eval_iter": iters, "eval_ap_s": curve}
        return {"metrics": {"AP_S": curve[-1]}, "curves": curves, "inputs": {}}

    rows = {
        "none": {s: rec([0.10 + s / 100, 0.11 + s / 100, 0.12 + s / 100]) for s in range(3)},
        # 2 points below none at iteration 200, level at 400, 1 point above at 600
        "hmkd": {
            s: rec([0.08 + s / 100, 0.11 + s / 100, 0.13 + s / 100 + (s - 1) / 1000])
            for s in range(3)
        },
    }
    along = report.along_run(rows)
    assert along["none"] == pytest.approx({200: 11.0, 400: 12.0, 600: 13.0})
    assert along["hmkd"][200].mean == pytest.approx(-2.0) and not along["hmkd"][200].within_noise
    assert along["hmkd"][400].mean == pytest.approx(0.0, abs=1e-9)
    assert along["hmkd"][600].mean == pytest.approx(1.0) and along["hmkd"][600].lo < 1.0
    table = report._along_table({"rows": rows})
    assert table[0] == "| row | iteration 200 | iteration 400 | iteration 600 |"
    assert table[2].startswith("| none | AP_S 11.0 | AP_S 12.0 | AP_S 13.0 |")
    assert table[3].startswith("| hmkd | -2.00 [")
    summary = report.summarize(PRESETS["smoke"], {"rows": rows, "teacher": None, "bases": []}, None)
    assert summary["rows"]["hmkd"]["along_run"]["600"]["delta_ap_s"] == pytest.approx(1.0)
    # evaluated once (the usual table): no section, nothing in the summary
    once = {
        row: {s: rec([r["curves"]["eval_ap_s"][-1]]) for s, r in recs.items()}
        for row, recs in rows.items()
    }
    assert report.along_run(once) == {} and report._along_table({"rows": once}) == []


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mimic", "hmkd"])
def test_per_level_calibration_brings_every_level_to_the_target(
    method: str, tiny_digits: dict[str, Path], tiny_teacher: Path
) -> None:
    teacher = tiny_model(backbone="resnet34", fpn_channels=32, weights=str(tiny_teacher))
    spec = tiny_spec(tiny_digits, teacher=teacher, distill={"method": method})
    first = probe(spec, batches=2)
    ratios = [s["grad_ratio"] for s in first["levels"].values()]
    assert max(ratios) > 1.5 * min(ratios)  # one weight leaves the levels apart
    target = 0.5
    spec.distill.weight = target / first["grad_ratio"]
    levels, blocks = per_level(spec, first, target, rounds=4, batches=2)
    assert set(levels) == {"p2", "p3", "p4"} and len(blocks) >= 1
    spec.distill.level_weights = levels
    last = probe(spec, batches=2)
    for lv, stats in last["levels"].items():
        # mimic's levels are apart, so its first guess is exact; HM's decoder hands each
        # level to the next finer one, and the further probes correct for that
        assert stats["grad_ratio"] == pytest.approx(target, rel=TOLERANCE + 0.01), lv
    # the probe shows each term's raw value, the level's multiplier taken out
    name = "mimic_p2" if method == "mimic" else "hm_p2"
    assert last["terms"][name]["raw"] == pytest.approx(first["terms"][name]["raw"], rel=1e-4)
