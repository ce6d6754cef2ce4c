"""The per-sample transform pipeline for detection datasets (torchvision transforms v2).

Resizing is deliberately absent: torchvision detectors resize and normalise inside their own
`GeneralizedRCNNTransform`, so doing it here too would resize twice and put boxes and
features out of step with what the evaluator sees.

The pipeline takes and returns ``(image, target)`` with ``image`` a ``tv_tensors.Image``
(3, H, W) and ``target["boxes"]`` a ``tv_tensors.BoundingBoxes`` (N, 4), so v2 moves boxes
with the pixels. It ends with `SanitizeBoundingBoxes`, so whatever a random transform does, no
box under ``MIN_BOX_SIDE`` pixels on a side reaches a model (torchvision detectors refuse
degenerate boxes mid-training with an assertion, far from the data that caused it).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

MIN_BOX_SIDE = 1.0
"""Smallest box side (pixels) a model is given; `SanitizeBoundingBoxes` allows nothing lower."""


def build_transforms(*, train: bool, hflip: bool) -> v2.Compose:
    """Build the pipeline applied to every ``(image, target)`` pair.

    ``train and hflip`` adds a random horizontal flip (p = 0.5); it draws from torch's global
    CPU RNG, which the dataset seeds per (seed, epoch, index) inside a forked RNG, so the flip
    is reproducible without touching the caller's random state. Evaluation (``train=False``)
    never flips, whatever ``hflip`` says.
    """
    steps: list[v2.Transform] = [
        v2.ToImage(),  # a no-op for tv_tensors.Image; turns a PIL image or ndarray into one
        v2.ToDtype(torch.float32, scale=True),  # uint8 -> [0, 1]; float input passes unchanged
    ]
    if train and hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    steps.append(v2.SanitizeBoundingBoxes(min_size=MIN_BOX_SIDE, min_area=MIN_BOX_SIDE**2))
    return v2.Compose(steps)


def has_random_transforms(*, train: bool, hflip: bool) -> bool:
    """Whether `build_transforms` with these flags draws random numbers (needs seeding)."""
    return train and hflip
