"""The benchmark's presets: the data, the two detectors, the schedules and the rows.

A preset is plain data so `docs/results.md` can print it, and a reviewer can see in one place
what the table was trained with. Specs are built as dicts and validated by `TrainSpec`, exactly
as a user's YAML would be; nothing here bypasses the library's own checks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hmkd_core.spec import TrainSpec

# Rows of the table after the teacher: the method, then the options that make the row.
ROWS: dict[str, dict[str, Any]] = {
    "none": {"method": "none"},
    "mimic": {"method": "mimic"},
    "fgd": {"method": "fgd"},
    "mgd": {"method": "mgd"},
    "hmkd": {"method": "hmkd"},
    "hmkd: HM only": {"method": "hmkd", "hmkd": {"sdm": {"enabled": False}}},
    "hmkd: SDM only": {"method": "hmkd", "hmkd": {"hm": {"enabled": False}}},
    "hmkd: student query": {"method": "hmkd", "hmkd": {"hm": {"query_source": "student"}}},
}


@dataclass(frozen=True)
class Preset:
    """One benchmark configuration. Sizes are chosen to fit the machine it names."""

    name: str
    machine: str
    data: dict[str, Any]  # make_small_digits arguments (train/val/size/...)
    tune_val: int  # images of the tuning split, drawn with another seed
    teacher: dict[str, Any]
    student: dict[str, Any]
    teacher_schedule: dict[str, Any]
    student_schedule: dict[str, Any]
    eval_every: int
    seeds: tuple[int, ...] = (0, 1)
    jobs: int = 1  # runs at once
    threads: int = 1  # torch threads per run
    device: str = "auto"
    rows: tuple[str, ...] = field(default=tuple(ROWS))


_ANCHORS = [8, 16, 32, 64, 128]

CPU = Preset(
    name="cpu",
    machine="2-core CPU",
    data={"train": 400, "val": 120, "size": 128, "seed": 0, "max_digits": 6, "max_side": 24},
    tune_val=80,
    teacher={"backbone": "resnet34", "fpn_channels": 64},
    student={"backbone": "resnet18", "fpn_channels": 32},
    teacher_schedule={"iterations": 1000, "batch_size": 4, "lr": 4e-4, "warmup_iters": 50},
    student_schedule={"iterations": 600, "batch_size": 2, "lr": 4e-4, "warmup_iters": 50},
    eval_every=200,
    jobs=2,
    threads=1,
    device="cpu",
)

GPU = Preset(
    name="gpu",
    machine="1 GPU",
    data={"train": 4000, "val": 500, "size": 512, "seed": 0, "max_digits": 16},
    tune_val=300,
    teacher={"backbone": "resnet50", "fpn_channels": 256},
    student={"backbone": "resnet18", "fpn_channels": 128},
    teacher_schedule={"iterations": 6000, "batch_size": 8, "lr": 2e-4, "warmup_iters": 300},
    student_schedule={"iterations": 4000, "batch_size": 8, "lr": 2e-4, "warmup_iters": 300},
    eval_every=1000,
    jobs=1,
    threads=8,
    device="cuda",
)

# The whole pipeline in about a minute, for the tests; its figures mean nothing.
SMOKE = Preset(
    name="smoke",
    machine="any",
    data={"train": 4, "val": 2, "size": 64, "seed": 0, "max_side": 20},
    tune_val=2,
    teacher={"backbone": "resnet18", "fpn_channels": 16},
    student={"backbone": "resnet18", "fpn_channels": 8},
    teacher_schedule={"iterations": 2, "batch_size": 2, "lr": 4e-4, "warmup_iters": 0},
    student_schedule={"iterations": 2, "batch_size": 2, "lr": 4e-4, "warmup_iters": 0},
    eval_every=0,
    jobs=2,
    threads=1,
    device="cpu",
)

PRESETS = {p.name: p for p in (CPU, GPU, SMOKE)}


def _model(preset: Preset, part: dict[str, Any], weights: str = "none") -> dict[str, Any]:
    size = preset.data["size"]
    return {
        "arch": "faster_rcnn",
        "anchor_sizes": _ANCHORS,
        "min_size": size,
        "max_size": size,
        "rpn_post_nms_top_n_train": 500,
        "box_batch_size_per_image": 128,
        "weights": weights,
        **part,
    }


def _split(root: Path, name: str) -> dict[str, str]:
    return {
        "images": str(root / name / "images"),
        "annotations": str(root / name / "annotations.json"),
    }


def base_spec(preset: Preset, data_root: Path, *, val_root: Path | None, seed: int) -> dict:
    """The parts every run of a preset shares: data, schedule shape, evaluation, runtime."""
    return {
        "data": {
            "train": _split(data_root, "train"),
            "val": _split(val_root or data_root, "val"),
        },
        "schedule": {"optimizer": "adamw", "weight_decay": 1e-4, "scheduler": "cosine"},
        "eval": {"every": preset.eval_every},
        "checkpoint": {"every": 10_000_000},  # the bench re-runs a run rather than resume it
        "runtime": {"seed": seed, "device": preset.device, "log_every": 10},
    }


def _checked(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate now (a bad preset fails before any run starts) but hand on the dict: the run
    applies the library's defaults when it starts, as a user's YAML would get them."""
    TrainSpec.model_validate(spec)
    return spec


def teacher_spec(preset: Preset, data_root: Path) -> dict[str, Any]:
    spec = base_spec(preset, data_root, val_root=None, seed=0)
    spec["student"] = _model(preset, preset.teacher)
    spec["schedule"].update(preset.teacher_schedule)
    return _checked(spec)


def student_spec(
    preset: Preset,
    data_root: Path,
    teacher_weights: Path,
    distill: dict[str, Any],
    *,
    seed: int,
    val_root: Path | None = None,
) -> dict[str, Any]:
    """A student run; `distill` is a `DistillSpec` dict (a row of ROWS, or a tuning variant)."""
    spec = base_spec(preset, data_root, val_root=val_root, seed=seed)
    spec["student"] = _model(preset, preset.student)
    spec["distill"] = copy.deepcopy(distill)
    if distill.get("method", "none") != "none":
        spec["teacher"] = _model(preset, preset.teacher, weights=str(teacher_weights))
    spec["schedule"].update(preset.student_schedule)
    return _checked(spec)
