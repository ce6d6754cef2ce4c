"""Run a detector over a dataset and score it with pycocotools, sharded across ranks.

Each rank predicts a strided slice of the images; rank 0 gathers the COCO result dicts and
scores them, so evaluation costs 1/world of the time and gives the same numbers as one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hmkd_core.data import CocoDetectionDataset
from hmkd_core.engine.distributed import DistContext, gather_objects
from hmkd_core.engine.reporter import Reporter
from hmkd_core.evaluation import CocoEvaluator
from hmkd_core.spec import TrainSpec

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


def evaluate_spec(
    spec: TrainSpec, out_dir: Path, reporter: Reporter | None = None
) -> dict[str, Any]:
    """Score `spec.student` (its `weights` name a trained file) on `spec.data.val`; no training.

    What an `evaluate` job runs: writes `eval.json` in `out_dir` and reports it, so a student
    can be measured on another split with the same metrics as its training run.
    """
    from hmkd_core.evaluation import write_eval_json
    from hmkd_core.models import build_detector

    if spec.data.val is None:
        raise ValueError("data.val: evaluation needs a validation split")
    reporter = reporter or Reporter()
    dataset = CocoDetectionDataset(spec.data.val.images, spec.data.val.annotations)
    device = torch.device("cuda" if spec.runtime.device == "cuda" else "cpu")
    model = build_detector(spec.student, dataset.num_classes).to(device)
    metrics = evaluate_detector(
        model,
        dataset,
        device=device,
        batch_size=spec.eval.batch_size,
        extra_area_ranges=spec.eval.extra_area_ranges,
    )
    assert metrics is not None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "eval.json"
    write_eval_json(metrics, path)
    reporter.on_evaluation(0, metrics)
    reporter.on_artifact("eval", path)
    return metrics
