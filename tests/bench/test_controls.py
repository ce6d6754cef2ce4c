"""The random-teacher control: the trained teacher's detector, weights drawn from the seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.controls import random_teacher
from bench.presets import ROWS, TEACHERS, row_distill, row_options, row_teacher
from hmkd_core.models import build_detector
from hmkd_core.models.export import StudentHeader, export_student, load_student
from hmkd_core.spec import DistillSpec, ModelSpec

TINY = dict(fpn_channels=16, min_size=64, max_size=64, anchor_sizes=[8, 16, 32, 64, 128])


@pytest.fixture
def trained(tmp_path: Path) -> Path:
    spec = ModelSpec(**TINY)
    model = build_detector(spec, num_classes=3)
    with torch.no_grad():  # "trained": weights no fresh draw would give
        for p in model.parameters():
            p.fill_(0.5)
    categories = [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]
    header = StudentHeader(spec, 3, categories, {1: 5, 2: 9}, {"AP": 0.4})
    return export_student(model, header, tmp_path / "teacher.pt")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_student(path)[0].state_dict()


def test_a_random_teacher_is_the_trained_detector_with_weights_drawn_from_the_seed(
    tmp_path: Path, trained: Path
) -> None:
    path = random_teacher(trained, 3, tmp_path / "a")
    model, header = load_student(path)
    own, theirs = model.state_dict(), _tensors(trained)
    assert own.keys() == theirs.keys()
    assert all(own[k].shape == theirs[k].shape for k in own)
    assert not any(torch.equal(own[k], theirs[k]) for k in own if k.endswith("conv1.weight"))
    # the categories stay (the run maps labels through them), the metrics do not
    assert header.label_to_category_id == {1: 5, 2: 9} and header.metrics == {}

    # the same seed draws the same weights anywhere; another seed, others
    again = _tensors(random_teacher(trained, 3, tmp_path / "b"))
    assert all(torch.equal(own[k], again[k]) for k in own)
    other = _tensors(random_teacher(trained, 4, tmp_path / "a"))
    assert not torch.equal(own["backbone.fpn.layer_blocks.0.0.weight"],
                           other["backbone.fpn.layer_blocks.0.0.weight"])  # fmt: skip


def test_drawing_a_random_teacher_leaves_the_callers_generator_alone(
    tmp_path: Path, trained: Path
) -> None:
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    random_teacher(trained, 0, tmp_path)
    assert torch.equal(torch.rand(4), expected)


def test_an_existing_draw_is_reused_not_drawn_again(tmp_path: Path, trained: Path) -> None:
    first = random_teacher(trained, 0, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert random_teacher(trained, 0, tmp_path) == first
    assert first.stat().st_mtime_ns == stamp


def test_rows_declare_their_teacher_apart_from_their_distill_options() -> None:
    for row in ROWS:
        assert row_teacher(row) in TEACHERS
        assert "teacher" not in row_options(row)
        DistillSpec.model_validate(row_options(row))  # what a spec gets is a valid DistillSpec
    assert row_teacher("hmkd") == "trained"
    assert row_teacher("hmkd: random teacher") == "random"
    # the control differs from its method's row only in the teacher it reads
    from bench.presets import HITUAV_CPU

    assert row_distill(HITUAV_CPU, "hmkd: random teacher") == row_distill(HITUAV_CPU, "hmkd")
    assert row_distill(HITUAV_CPU, "mimic: random teacher") == row_distill(HITUAV_CPU, "mimic")
