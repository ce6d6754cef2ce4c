"""Batching for detection: images of different sizes travel as lists, not stacked tensors.

torchvision detectors take ``list[Tensor (3, H_i, W_i)]`` and ``list[dict]`` and batch (resize,
pad) inside their own transform, so the collate function must not try to stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler


def collate_detection(
    batch: Sequence[tuple[Tensor, dict[str, Any]]],
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Turn ``[(image, target), ...]`` into ``([image, ...], [target, ...])``, order kept."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    sampler: Sampler | None = None,
    shuffle: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A `DataLoader` over a detection dataset, batched with `collate_detection`.

    Workers are not persistent on purpose: each epoch's workers get a fresh copy of the dataset,
    so the epoch set by ``dataset.set_epoch`` before iterating reaches them (persistent workers
    would keep augmenting with the epoch they were started with). Memory is pinned only when
    CUDA exists, where it speeds host-to-device copies; elsewhere it only costs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if sampler is not None and shuffle:
        raise ValueError(
            "pass either a sampler or shuffle=True, not both: the sampler decides the order "
            "(shuffle a DistributedSampler through its own shuffle argument)"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_detection,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
