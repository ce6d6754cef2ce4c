"""The exported student: a plain torchvision state dict plus a small header.

The header carries what is needed to rebuild the detector (its `ModelSpec`), the dataset's
categories (labels map back to the dataset's own ids), and the metrics it earned, so
`load_student(path)` returns a ready torchvision model with one call. Nothing of the distiller
or the teacher is in it, and it is loaded with `weights_only=True`: an artifact is data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hmkd_core.data.coco import category_names
from hmkd_core.models.builders import WeightsError, build_detector, resolve_norm
from hmkd_core.spec import NAMED_WEIGHTS, ModelSpec, TrainSpec

FORMAT = "hmkd-student"
VERSION = 1


@dataclass
class StudentHeader:
    model: ModelSpec
    num_classes: int
    categories: list[dict[str, Any]]
    label_to_category_id: dict[int, int]
    metrics: dict[str, Any] = field(default_factory=dict)


def export_student(model: nn.Module, header: StudentHeader, path: Path) -> Path:
    """Write the student atomically (temp file + rename) so a reader never sees half a file."""
    from hmkd_core.engine.checkpoint import save_atomic

    blob = {
        "format": FORMAT,
        "version": VERSION,
        "model": header.model.model_copy(
            update={"weights": "none", "backbone_norm": resolve_norm(header.model)}
        ).model_dump(mode="json"),
        "num_classes": header.num_classes,
        "categories": header.categories,
        "label_to_category_id": {int(k): int(v) for k, v in header.label_to_category_id.items()},
        "metrics": header.metrics,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    save_atomic(blob, Path(path))
    return Path(path)


def read_model_spec(path: str | Path) -> ModelSpec:
    """The `ModelSpec` a `student.pt` was built with, without building it: the tensors are
    memory-mapped, not read, so a service can check a spec against big weights at submit."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise WeightsError(f"{path}: not a readable student file ({err})") from err
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise WeightsError(f"{path}: not an exported student (format {FORMAT!r} expected)")
    try:
        return ModelSpec.model_validate(blob["model"])
    except (KeyError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        raise WeightsError(
            f"{path}: its recorded model is not one this version builds ({err})"
        ) from None


def read_categories(path: str | Path) -> list[dict[str, Any]] | None:
    """The categories a `student.pt` was trained on (its labels 1..K, in this order), read
    without its tensors; None for a file that is not an exported student (a checkpoint),
    WeightsError for one whose header is malformed."""
    try:
        blob = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        return None
    categories = blob.get("categories") or []
    well_formed = isinstance(categories, list) and all(
        isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name", ""), str)
        for c in categories
    )
    if not well_formed:  # a hand-made file: its header is as untrusted as any input
        raise WeightsError(
            f"{path}: its 'categories' are not a list of {{'id': int, 'name': str}}; it is "
            "not a student.pt this library exported"
        )
    return categories


def labels_compared(spec: TrainSpec, role: str, *, evaluate: bool) -> bool:
    """Whether the `role` ("student" or "teacher") weights of `spec` must have been trained on
    the very categories of the data, not only as many: an evaluation scores the student's
    labels as the split's classes, and the response terms match the teacher's class k to the
    student's class k."""
    return evaluate or (role == "teacher" and spec.distill.response.active)


def check_trained_on(
    path: str | Path, categories: list[dict[str, Any]], *, same_classes: bool
) -> None:
    """Refuse an exported student trained on other categories than a split's (COCO category
    dicts): another number of them cannot load into the split's detector, and with
    `same_classes` (evaluation, which maps labels to ids through the split's list) every label
    must stand for the same id and name. Other files pass: their tensors are checked on load."""
    if str(path) in NAMED_WEIGHTS:
        return
    trained = read_categories(path)
    if trained is None:
        return
    theirs, ours = category_names(trained), category_names(categories)
    if len(theirs) != len(ours):
        raise WeightsError(
            f"{path}: trained on {len(theirs)} categories, but the data lists {len(ours)}; "
            "its box predictor cannot load into this dataset's detector"
        )
    if same_classes and theirs != ours:
        raise WeightsError(
            f"{path}: trained on categories {theirs}, but the data lists {ours}; its labels "
            "would be scored as other classes: evaluate it on a split of the same categories"
        )


def load_student(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, StudentHeader]:
    """Rebuild the torchvision detector from a `student.pt`; returns it in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such student file")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path}: not a readable student file ({err})") from err
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise WeightsError(f"{path}: not an exported student (format {FORMAT!r} expected)")
    if blob.get("version") != VERSION:
        raise WeightsError(f"{path}: student format version {blob.get('version')} is not {VERSION}")
    header = StudentHeader(
        model=ModelSpec.model_validate(blob["model"]),
        num_classes=int(blob["num_classes"]),
        categories=list(blob["categories"]),
        label_to_category_id={int(k): int(v) for k, v in blob["label_to_category_id"].items()},
        metrics=dict(blob.get("metrics", {})),
    )
    model = build_detector(header.model, header.num_classes)
    model.load_state_dict(blob["state_dict"])
    return model.eval(), header
