"""Shared fixtures: a tiny SmallDigits set made once per session, and tiny specs over it."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from hmkd_core.spec import TrainSpec, parse_spec


@pytest.fixture(autouse=True)
def _restore_rng() -> Any:
    """Tests that seed or draw from the global RNGs must not change what the next one sees."""
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    yield
    torch.set_rng_state(torch_state)
    random.setstate(py_state)


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from hmkd_core.data import make_small_digits

    out = tmp_path_factory.mktemp("digits")
    return make_small_digits(out, train=8, val=4, size=64, seed=0, min_digits=2, max_digits=3)


def png_bytes(width: int, height: int, value: int = 0) -> bytes:
    """A real grey PNG of the given size (a few hundred bytes): the submit check opens every
    image's header and compares its size with the annotation's."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (width, height), value).save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_model(**overrides: Any) -> dict[str, Any]:
    model = {
        "backbone": "resnet18",
        "fpn_channels": 16,
        "min_size": 64,
        "max_size": 64,
        "anchor_sizes": [8, 16, 32, 64, 128],
    }
    model.update(overrides)
    return model


def export_tiny_student(path: Path, categories: list[dict[str, Any]]) -> Path:
    """A `student.pt` of `tiny_model`'s detector with random weights, exported as trained on
    `categories` (COCO category dicts, labels 1..K in this order)."""
    from hmkd_core.models import StudentHeader, build_detector, export_student
    from hmkd_core.spec import ModelSpec

    model = ModelSpec(**tiny_model())
    labels = {k + 1: c["id"] for k, c in enumerate(categories)}
    header = StudentHeader(model, len(categories) + 1, categories, labels)
    return export_student(build_detector(model, header.num_classes), header, path)


def tiny_spec_dict(paths: dict[str, Path], **sections: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "data": {
            "train": {
                "images": str(paths["train_images"]),
                "annotations": str(paths["train_annotations"]),
            },
            "val": {
                "images": str(paths["val_images"]),
                "annotations": str(paths["val_annotations"]),
            },
        },
        "student": tiny_model(),
        "schedule": {
            "iterations": 4,
            "batch_size": 2,
            "lr": 0.01,
            "warmup_iters": 2,
            "scheduler": "constant",
        },
        "eval": {"every": 0, "batch_size": 4},
        "checkpoint": {"every": 100},
        "runtime": {"seed": 0, "log_every": 1, "device": "cpu"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def tiny_spec(paths: dict[str, Path], **sections: Any) -> TrainSpec:
    return parse_spec(tiny_spec_dict(paths, **sections))


@pytest.fixture(scope="session")
def tiny_teacher(tiny_digits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher trained for a few iterations: enough to be a real, loadable student.pt."""
    from hmkd_core.engine import train

    out = tmp_path_factory.mktemp("teacher")
    spec = tiny_spec(tiny_digits, student=tiny_model(backbone="resnet34", fpn_channels=32))
    student = train(spec, out).student_path
    # its training checkpoints (three of a ResNet-34) are read by no test and outlive the run
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return student


pytest_plugins = ["tests.service_fixtures"]
