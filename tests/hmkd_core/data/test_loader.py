"""Detection batching: lists in, lists out, and augmentation that ignores the worker count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import SequentialSampler

from hmkd_core.data import CocoDetectionDataset, build_loader, collate_detection


def test_collate_keeps_images_of_different_sizes_as_lists() -> None:
    batch = [
        (torch.zeros(3, 10, 12), {"boxes": torch.zeros(2, 4), "labels": torch.ones(2)}),
        (torch.zeros(3, 7, 5), {"boxes": torch.zeros(0, 4), "labels": torch.ones(0)}),
    ]
    images, targets = collate_detection(batch)

    assert isinstance(images, list) and isinstance(targets, list)
    assert [tuple(im.shape) for im in images] == [(3, 10, 12), (3, 7, 5)]
    assert [t["boxes"].shape[0] for t in targets] == [2, 0]
    assert targets[0] is batch[0][1]


def test_loader_yields_batches_of_lists(tiny_digits: dict[str, Path]) -> None:
    ds = CocoDetectionDataset(tiny_digits["train_images"], tiny_digits["train_annotations"])
    loader = build_loader(ds, batch_size=3, drop_last=True)
    batches = list(loader)

    assert len(batches) == len(ds) // 3
    images, targets = batches[0]
    assert len(images) == len(targets) == 3
    assert images[0].shape == (3, 64, 64) and images[0].dtype == torch.float32
    assert [t["image_id"] for t in targets] == ds.image_ids[:3]
    assert targets[0]["boxes"].shape[1] == 4 and targets[0]["labels"].dtype == torch.int64


def test_sampler_and_shuffle_together_are_refused(tiny_digits: dict[str, Path]) -> None:
    ds = CocoDetectionDataset(tiny_digits["val_images"], tiny_digits["val_annotations"])
    with pytest.raises(ValueError, match="either a sampler or shuffle"):
        build_loader(ds, batch_size=2, sampler=SequentialSampler(ds), shuffle=True)


def test_augmentation_does_not_depend_on_workers(tiny_digits: dict[str, Path]) -> None:
    ds = CocoDetectionDataset(
        tiny_digits["train_images"], tiny_digits["train_annotations"], train=True, hflip=True
    )
    ds.set_epoch(3)

    def run(num_workers: int) -> list[torch.Tensor]:
        out = []
        for images, targets in build_loader(ds, batch_size=2, num_workers=num_workers):
            out += [im.sum(dim=0) for im in images] + [t["boxes"] for t in targets]
        return out

    in_process, with_workers = run(0), run(2)
    assert all(torch.equal(a, b) for a, b in zip(in_process, with_workers, strict=True))
