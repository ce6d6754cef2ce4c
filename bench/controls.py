"""Negative controls: teachers that know nothing of the data.

A distillation row that loses to `none` may lose because its teacher's knowledge does not
reach the student, or because any pull on the student's features costs more than the
knowledge is worth. A teacher with the trained teacher's architecture, head and feature
shapes but freshly drawn weights separates the two: the method's loss and its machinery are
unchanged, only what the teacher knows is gone.

Each seed draws its own random teacher, so a row's interval spans the draws as well as the
data order. The draw is a pure function of the seed (the CPU generator), so every machine
draws the same weights, and a finished run is recognised by the file's digest.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from hmkd_core.models import build_detector
from hmkd_core.models.export import export_student, load_student

# Keeps the teachers' draws apart from the streams a run seeds with its own seed.
DRAW_OFFSET = 7_000_003


def random_teacher(trained: Path, seed: int, folder: Path) -> Path:
    """The detector `trained` describes, with weights drawn from `seed`, as a student file.

    Written once under `folder` and reused; the header keeps the trained teacher's categories
    so the run reads it exactly as it reads the trained one.
    """
    out = folder / f"random-teacher-seed{seed}.pt"
    if out.is_file():
        return out
    with torch.random.fork_rng(devices=[]):  # rebuilding a detector draws weights too
        _, header = load_student(trained)
        torch.manual_seed(DRAW_OFFSET + seed)
        model = build_detector(header.model, header.num_classes)
    folder.mkdir(parents=True, exist_ok=True)
    return export_student(model, replace(header, metrics={}), out)
