"""Negative controls: teachers that know nothing of the data.

A distillation row that loses to `none` may lose because its teacher's knowledge does not
reach the student, or because any pull on the student's features costs more than the
knowledge is worth. A teacher with the trained teacher's architecture, head and feature
shapes but freshly drawn weights separates the two: the method's loss and its machinery are
unchanged, only what the teacher knows is gone.

Each seed draws its own random teacher, so a row's interval spans the draws as well as the
data order. The draw depends only on the teacher's description, the data's categories and the
seed (the CPU generator): machines with the same torch and torchvision draw the same weights,
and it needs no trained teacher, so a table of controls runs while the teacher still trains.
A draw made elsewhere with other weights is recognised by its digest, which every record
keeps, and runs again rather than being paired with records of another draw.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from hmkd_core.data import CocoDetectionDataset
from hmkd_core.models import build_detector
from hmkd_core.models.export import StudentHeader, export_student
from hmkd_core.spec import ModelSpec

# Keeps the teachers' draws apart from the streams a run seeds with its own seed.
DRAW_OFFSET = 7_000_003


def random_teacher(
    teacher: ModelSpec, train: tuple[Path, Path], *, seed: int, folder: Path
) -> Path:
    """The detector `teacher` describes (its `weights` aside), sized for the categories of the
    training split `train` (images, annotations) as the trained teacher is, with weights drawn
    from `seed`; written as a student file, the format a run reads a teacher from, under
    `folder` the first time and reused after."""
    model = teacher.model_copy(update={"weights": "none"})
    data = CocoDetectionDataset(*train)
    described = json.dumps(
        [model.model_dump(mode="json"), data.categories, DRAW_OFFSET], sort_keys=True
    )
    key = hashlib.sha256(described.encode()).hexdigest()[:10]
    out = folder / f"random-teacher-{key}-seed{seed}.pt"
    if out.is_file():
        return out
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DRAW_OFFSET + seed)
        detector = build_detector(model, data.num_classes)
    header = StudentHeader(
        model=model,
        num_classes=data.num_classes,
        categories=data.categories,
        label_to_category_id=data.label_to_category_id,
    )
    folder.mkdir(parents=True, exist_ok=True)
    return export_student(detector, header, out)
