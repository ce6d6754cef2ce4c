"""Shared fixtures for the distiller tests: seeded RNG and a tiny synthetic batch."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from hmkd_core.distill import DistillInputs

SIZES = {"p2": (32, 32), "p3": (16, 16), "p4": (8, 8)}
IMAGE_SIZE = (128, 128)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every distiller test starts from seed 0 (tests/conftest.py restores the RNG after)."""
    torch.manual_seed(0)


def random_features(
    batch: int, channels: int, sizes: dict[str, tuple[int, int]] | None = None
) -> dict[str, torch.Tensor]:
    """Random (B, C, H_l, W_l) maps for each level of `sizes` (default P2..P4 of a 128 image)."""
    return {lv: torch.randn(batch, channels, *hw) for lv, hw in (sizes or SIZES).items()}


@pytest.fixture
def make_features() -> Callable[..., dict[str, torch.Tensor]]:
    """Factory: `make_features(batch, channels, sizes=None)` -> level -> random map."""
    return random_features


def make_boxes() -> list[torch.Tensor]:
    """Two images on a 128x128 canvas: a large, a small and a tiny box; then no boxes at all."""
    return [
        torch.tensor(
            [[8.0, 8.0, 72.0, 64.0], [80.0, 90.0, 92.0, 100.0], [40.0, 100.0, 42.0, 102.0]]
        ),
        torch.zeros(0, 4),
    ]


@pytest.fixture
def make_inputs() -> Callable[..., DistillInputs]:
    """Factory: `make_inputs(student_channels=..., teacher_channels=..., batch=2)`."""

    def build(
        student_channels: int = 32, teacher_channels: int = 32, batch: int = 2
    ) -> DistillInputs:
        boxes = (make_boxes() * batch)[:batch]
        return DistillInputs(
            student=random_features(batch, student_channels),
            teacher=random_features(batch, teacher_channels),
            boxes=boxes,
            image_size=IMAGE_SIZE,
        )

    return build
