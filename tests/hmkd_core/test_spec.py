"""The spec refuses what would silently change an experiment, naming the field path."""

from __future__ import annotations

from pathlib import Path

import pytest

from hmkd_core.spec import SpecError, load_spec, parse_spec
from tests.conftest import tiny_spec_dict

PATHS = {
    "train_images": Path("tr"),
    "train_annotations": Path("tr.json"),
    "val_images": Path("va"),
    "val_annotations": Path("va.json"),
}


def test_defaults_parse() -> None:
    spec = parse_spec(tiny_spec_dict(PATHS))
    assert spec.distill.method == "none"
    assert spec.distill.hmkd.hm.window == 3


@pytest.mark.parametrize(
    ("section", "value", "path"),
    [
        ("schedule", {"lr": -1}, "schedule.lr"),
        ("schedule", {"learning_rate": 0.1}, "schedule.learning_rate"),
        ("distill", {"method": "kd"}, "distill.method"),
        ("distill", {"levels": ["p9"]}, "distill.levels"),
        ("distill", {"level_weights": {"p9": 1.0}}, "distill.level_weights"),
        ("schedule", {"lr": True}, "schedule.lr"),  # pydantic alone reads true as 1
        ("schedule", {"clip_grad_norm": False}, "schedule.clip_grad_norm"),
        ("distill", {"level_weights": {"p2": True}}, "distill.level_weights"),
        ("distill", {"level_weights": {"p2": -1.0}}, "distill.level_weights.p2"),
        ("distill", {"hmkd": {"hm": {"level_weights": {"x": 1.0}}}}, "distill.hmkd.hm.level_w"),
        ("student", {"anchor_sizes": [8, 16]}, "student.anchor_sizes"),
        ("distill", {"method": "hmkd", "hmkd": {"hm": {"window": 4}}}, "distill.hmkd.hm.window"),
        ("student", {"image_std": [0.2, 0.2, 0.0]}, "student.image_std"),
        ("student", {"backbone": "resnet18", "weights": "coco"}, "student.weights: COCO"),
        ("eval", {"extra_area_ranges": {"M": [0, 10]}}, "eval.extra_area_ranges"),
        ("eval", {"extra_area_ranges": {"big": [10, 10]}}, "eval.extra_area_ranges"),
        ("eval", {"extra_area_ranges": {"a\tb": [0, 10]}}, "eval.extra_area_ranges"),
        ("eval", {"extra_area_ranges": {"nul\x00": [0, 10]}}, "eval.extra_area_ranges"),
        ("eval", {"extra_area_ranges": {"neg": [-1, 10]}}, "eval.extra_area_ranges"),
    ],
)
def test_bad_values_name_the_field(section: str, value: dict, path: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(tiny_spec_dict(PATHS, **{section: value}))
    assert path in str(err.value)


def test_numbers_may_come_as_strings_from_yaml_but_not_as_booleans() -> None:
    spec = parse_spec(tiny_spec_dict(PATHS, schedule={"lr": "1e-4", "iterations": 3}))
    assert spec.schedule.lr == 1e-4  # YAML reads 1e-4 (no dot) as a string
    assert parse_spec(tiny_spec_dict(PATHS, data={"hflip": False})).data.hflip is False
    with pytest.raises(SpecError, match=r"schedule\.iterations: .*expected a number, got true"):
        parse_spec(tiny_spec_dict(PATHS, schedule={"iterations": True}))


def test_distillation_needs_a_trained_teacher() -> None:
    with pytest.raises(SpecError, match="needs a teacher"):
        parse_spec(tiny_spec_dict(PATHS, distill={"method": "hmkd"}))
    d = tiny_spec_dict(PATHS, distill={"method": "mimic"})
    d["teacher"] = {"backbone": "resnet34"}
    with pytest.raises(SpecError, match=r"teacher\.weights"):
        parse_spec(d)


def test_alignment_must_leave_iterations_to_distil() -> None:
    d = tiny_spec_dict(PATHS, distill={"method": "mimic", "align_iters": 4})
    d["teacher"] = {**d["student"], "weights": "t.pt"}
    d["schedule"]["iterations"] = 4
    with pytest.raises(SpecError, match=r"distill\.align_iters: 4 leaves none of the 4"):
        parse_spec(d)
    d["schedule"]["iterations"] = 5
    assert parse_spec(d).distill.align_iters == 4


def test_class_score_distillation_needs_a_teacher_and_faster_rcnn_on_both_sides() -> None:
    d = tiny_spec_dict(PATHS, distill={"response": {"weight": 1.0}})
    with pytest.raises(SpecError, match=r"distill\.response\.weight: .*needs a teacher"):
        parse_spec(d)
    d["distill"]["method"] = "mimic"
    d["teacher"] = {**d["student"], "weights": "t.pt"}
    assert parse_spec(d).distill.response.weight == 1.0
    for role in ("student", "teacher"):
        other = {**d, role: {**d[role], "arch": "retinanet"}, "distill": {**d["distill"]}}
        other["distill"]["levels"] = ["p3", "p4", "p5"]
        with pytest.raises(SpecError, match=rf"distill\.response\.weight: .*Faster R-CNN {role}"):
            parse_spec(other)
    d["distill"]["response"]["temperature"] = 0
    with pytest.raises(SpecError, match=r"distill\.response\.temperature"):
        parse_spec(d)
    d["distill"]["response"]["temperature"] = 1
    # its box predictor is not trained on these classes
    d["teacher"] = {**d["teacher"], "backbone": "resnet50", "weights": "coco"}
    with pytest.raises(SpecError, match=r"distill\.response\.weight: .*'coco'"):
        parse_spec(d)


@pytest.mark.parametrize("term", ["box_weight", "objectness_weight"])
def test_each_response_term_alone_is_checked_and_named(term: str) -> None:
    d = tiny_spec_dict(PATHS, distill={"response": {term: 0.5}})
    with pytest.raises(SpecError, match=rf"distill\.response\.{term}: .*needs a teacher"):
        parse_spec(d)
    d["distill"]["method"] = "mimic"
    d["teacher"] = {**d["student"], "weights": "imagenet"}
    with pytest.raises(SpecError, match=rf"distill\.response\.{term}: .*'imagenet'"):
        parse_spec(d)
    d["teacher"]["weights"] = "t.pt"
    assert parse_spec(d).distill.response.active == [term]
    d["distill"]["response"][term] = -1.0
    with pytest.raises(SpecError, match=rf"distill\.response\.{term}"):
        parse_spec(d)


def test_sdm_background_must_be_damped() -> None:
    d = tiny_spec_dict(PATHS, distill={"method": "hmkd", "hmkd": {"sdm": {"alpha": 1, "beta": 2}}})
    d["teacher"] = {"weights": "t.pt"}
    with pytest.raises(SpecError, match="beta"):
        parse_spec(d)


def test_yaml_relative_paths_resolve_against_the_spec(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    f = tmp_path / "cfg" / "run.yaml"
    f.write_text(
        "data:\n  train: {images: ../data/img, annotations: ../data/a.json}\n"
        "student: {backbone: resnet18}\n"
    )
    spec = load_spec(f)
    assert spec.data.train.images == (tmp_path / "data" / "img").resolve()


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(lst)


def test_coco_weights_name_the_backbones_that_have_them() -> None:
    with pytest.raises(
        SpecError, match=r"student\.weights: COCO weights exist for resnet50 .*not resnet34"
    ):
        parse_spec(tiny_spec_dict(PATHS, student={"backbone": "resnet34", "weights": "coco"}))
    spec = parse_spec(tiny_spec_dict(PATHS, student={"backbone": "resnet50", "weights": "coco"}))
    assert spec.student.weights == "coco"


@pytest.mark.parametrize(
    "ranges",
    [{"small": (0.0, 10.0)}, {"x": (10.0, 10.0)}, {"x": (-1.0, 4.0)}, {"\x00": (0, 1)}],
)
def test_the_spec_and_the_evaluator_refuse_the_same_area_ranges(ranges: dict) -> None:
    from hmkd_core.evaluation.coco_eval import EvaluationError, _check_area_ranges

    with pytest.raises(SpecError, match=r"eval\.extra_area_ranges") as at_submit:
        parse_spec(tiny_spec_dict(PATHS, eval={"extra_area_ranges": ranges}))
    with pytest.raises(EvaluationError) as at_evaluation:
        _check_area_ranges(ranges)
    assert str(at_evaluation.value) in str(at_submit.value)  # one rule, one message


def test_area_range_names_are_any_short_printable_text() -> None:
    """Names users gave before the rule (a hyphen, an accent) still parse: a stored job's
    spec is validated again when it runs."""
    ranges = {"tiny": (0.0, 64.0), "huge-2": (9216.0, 1e10), "très_petit": (0.0, 4.0)}
    spec = parse_spec(
        tiny_spec_dict(PATHS, eval={"extra_area_ranges": ranges, "metric": "AP_huge-2"})
    )
    assert spec.eval.extra_area_ranges == ranges


def test_a_deep_query_needs_the_teachers_two_coarser_levels() -> None:
    teacher = {**tiny_spec_dict(PATHS)["student"], "weights": "t.pt"}
    distill = {"method": "hmkd", "hmkd": {"hm": {"query_levels": "deep"}}}
    ok = parse_spec(tiny_spec_dict(PATHS, teacher=teacher, distill=distill))
    assert ok.distill.hmkd.hm.query_levels == "deep"  # p2-p4 read p5, p6
    with pytest.raises(SpecError, match=r"query_levels: 'deep' .* no \['p7'\]"):
        parse_spec(
            tiny_spec_dict(
                PATHS, teacher=teacher, distill={**distill, "levels": ["p3", "p4", "p5"]}
            )
        )
