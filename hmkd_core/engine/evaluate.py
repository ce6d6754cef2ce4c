"""Run a detector over a dataset and score it with pycocotools, sharded across ranks.

Each rank predicts a strided slice of the images; rank 0 gathers the COCO result dicts and
scores them, so evaluation costs 1/world of the time and gives the same numbers as one process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hmkd_core.data import CocoDetectionDataset
from hmkd_core.engine.distributed import DistContext, gather_objects
from hmkd_core.evaluation import CocoEvaluator

_SINGLE = DistContext(rank=0, world_size=1, device=torch.device("cpu"))


@torch.no_grad()
def evaluate_detector(
    model: nn.Module,
    dataset: CocoDetectionDataset,
    *,
    device: torch.device,
    batch_size: int = 4,
    extra_area_ranges: dict[str, tuple[float, float]] | None = None,
    ctx: DistContext | None = None,
) -> dict[str, Any] | None:
    """COCO metrics on rank 0 (None elsewhere). Restores the model's train/eval mode."""
    ctx = ctx or _SINGLE
    was_training = model.training
    model.eval()
    evaluator = CocoEvaluator(
        dataset.coco, dataset.label_to_category_id, extra_area_ranges=extra_area_ranges
    )
    indices = list(range(ctx.rank, len(dataset), ctx.world_size))
    for start in range(0, len(indices), batch_size):
        chunk = [dataset[i] for i in indices[start : start + batch_size]]
        images = [img.as_subclass(torch.Tensor).to(device) for img, _ in chunk]
        outputs = model(images)
        outputs = [{k: v.float().cpu() for k, v in out.items()} for out in outputs]
        evaluator.process(outputs, [int(t["image_id"]) for _, t in chunk])
    model.train(was_training)
    # Image ids travel with the results: an image with no detections still counts its misses.
    gathered = gather_objects((evaluator.results(), evaluator.image_ids()), ctx)
    if not ctx.is_main:
        return None
    others = [part for rank, part in enumerate(gathered) if rank != ctx.rank]
    return evaluator.evaluate(
        extra_results=[r for results, _ in others for r in results],
        extra_image_ids=[i for _, ids in others for i in ids],
    )
