"""The random-teacher control: the trained teacher's detector, weights drawn from the seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.controls import random_teacher
from bench.presets import (
    ROWS,
    TEACHERS,
    is_control,
    measured_as,
    row_distill,
    row_options,
    row_teacher,
)
from hmkd_core.data import make_small_digits
from hmkd_core.models import build_detector
from hmkd_core.models.export import load_student
from hmkd_core.spec import DistillSpec, ModelSpec

TINY = dict(fpn_channels=16, min_size=64, max_size=64, anchor_sizes=[8, 16, 32, 64, 128])


@pytest.fixture(scope="module")
def train(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    paths = make_small_digits(tmp_path_factory.mktemp("digits"), train=2, val=1, size=64, seed=0)
    return paths["train_images"], paths["train_annotations"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_student(path)[0].state_dict()


def test_a_random_teacher_is_the_described_detector_with_weights_drawn_from_the_seed(
    tmp_path: Path, train: tuple[Path, Path]
) -> None:
    spec = ModelSpec(**TINY, weights=str(tmp_path / "trained.pt"))  # its path is not read
    path = random_teacher(spec, train, seed=3, folder=tmp_path / "a")
    model, header = load_student(path)
    fresh = build_detector(ModelSpec(**TINY), 11)  # SmallDigits: ten digits and background
    own = model.state_dict()
    assert own.keys() == fresh.state_dict().keys()
    assert all(own[k].shape == v.shape for k, v in fresh.state_dict().items())
    assert header.num_classes == 11 and len(header.label_to_category_id) == 10
    assert header.metrics == {}
    # the file serves as a teacher's `weights:` (the way the row's run reads it)
    as_teacher = build_detector(spec.model_copy(update={"weights": str(path)}), 11)
    assert all(torch.equal(own[k], v) for k, v in as_teacher.state_dict().items())

    # the same seed draws the same weights anywhere, whatever trained teacher the spec names;
    # another seed, others
    elsewhere = spec.model_copy(update={"weights": str(tmp_path / "another.pt")})
    again = _tensors(random_teacher(elsewhere, train, seed=3, folder=tmp_path / "b"))
    assert all(torch.equal(own[k], again[k]) for k in own)
    other = _tensors(random_teacher(spec, train, seed=4, folder=tmp_path / "a"))
    layer = "backbone.fpn.layer_blocks.0.0.weight"
    assert not torch.equal(own[layer], other[layer])
    # another architecture is another draw, not the same file
    wider_spec = ModelSpec(**{**TINY, "fpn_channels": 32})
    wider = random_teacher(wider_spec, train, seed=3, folder=tmp_path / "a")
    assert wider != path and load_student(wider)[0].state_dict()[layer].shape[0] == 32


def test_drawing_a_random_teacher_leaves_the_callers_generator_alone(
    tmp_path: Path, train: tuple[Path, Path]
) -> None:
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    random_teacher(ModelSpec(**TINY), train, seed=0, folder=tmp_path)
    assert torch.equal(torch.rand(4), expected)


def test_an_existing_draw_is_reused_not_drawn_again(
    tmp_path: Path, train: tuple[Path, Path]
) -> None:
    first = random_teacher(ModelSpec(**TINY), train, seed=0, folder=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert random_teacher(ModelSpec(**TINY), train, seed=0, folder=tmp_path) == first
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

    # (HMKD's at the weight that matches its pull, measured by gradient ratio)
    control = row_distill(HITUAV_CPU, "hmkd: random teacher")
    method = row_distill(HITUAV_CPU, "hmkd")
    assert control["weight"] == pytest.approx(0.0224 * method["weight"])
    assert {**control, "weight": method["weight"]} == method
    mimic = row_distill(HITUAV_CPU, "mimic")
    control = row_distill(HITUAV_CPU, "mimic: random teacher")
    assert control["weight"] == pytest.approx(1.11 * mimic["weight"])
    assert {**control, "weight": mimic["weight"]} == mimic
    # matched at the from-scratch rows' start, on that preset's own calibrated weight
    from bench.presets import CPU_SCRATCH

    mimic = row_distill(CPU_SCRATCH, "mimic")
    control = row_distill(CPU_SCRATCH, "mimic: random teacher, from-scratch match")
    assert control["weight"] == pytest.approx(1.75 * mimic["weight"])
    assert {**control, "weight": mimic["weight"]} == mimic
    assert measured_as("mimic: random teacher, from-scratch match") == "mimic"


def test_a_controls_step_is_measured_as_its_methods() -> None:
    assert measured_as("hmkd: random teacher") == "hmkd"
    assert measured_as("mimic: random teacher") == "mimic"
    assert measured_as("hmkd: P2 only") == "hmkd: P2 only"
    # a variant that changes only the weight computes its method's step
    assert measured_as("hmkd: quarter weight") == "hmkd"
    assert measured_as("mimic: random teacher, quarter weight") == "mimic"
    assert measured_as("hmkd: HM only, full weight") == "hmkd: HM only"
    assert all(not is_control(measured_as(r)) for r in ROWS)
