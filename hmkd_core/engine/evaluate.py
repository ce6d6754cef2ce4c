"""Run a detector over a dataset and score it with pycocotools, sharded across ranks.

Each rank predicts a strided slice of the images; rank 0 gathers the COCO result dicts and
scores them, so evaluation costs 1/world of the time and gives the same numbers as one process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hmkd_core.atomic import atomic_write
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
    predictions_path: Path | None = None,
) -> dict[str, Any] | None:
    """COCO metrics on rank 0 (None elsewhere). Restores the model's train/eval mode.

    With `predictions_path`, rank 0 also writes what the detector found on the first few
    images, beside their ground truth (`write_predictions`): the picture a user checks when a
    metric looks wrong."""
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
    extra = [r for results, _ in others for r in results]
    if predictions_path is not None:
        write_predictions(dataset, evaluator.results() + extra, predictions_path)
    return evaluator.evaluate(
        extra_results=extra,
        extra_image_ids=[i for _, ids in others for i in ids],
    )


PREDICTION_IMAGES = 8
MIN_SCORE = 0.3
MAX_DETECTIONS = 100


def write_predictions(
    dataset: CocoDetectionDataset, results: list[dict[str, Any]], path: Path
) -> Path:
    """The first PREDICTION_IMAGES images that have ground truth, each with its true boxes and
    the detections scoring at least MIN_SCORE (COCO [x, y, w, h] in the image's own pixels)."""
    names = {c["id"]: str(c.get("name", c["id"])) for c in dataset.categories}
    with_truth = sorted({a["image_id"] for a in dataset.coco.dataset["annotations"]})
    chosen = with_truth[:PREDICTION_IMAGES]
    found: dict[int, list[dict[str, Any]]] = {i: [] for i in chosen}
    for r in results:
        if r["image_id"] in found and r["score"] >= MIN_SCORE:
            found[r["image_id"]].append(r)
    images = []
    for image_id in chosen:
        info = dataset.coco.imgs[image_id]
        truth = dataset.coco.imgToAnns.get(image_id, [])
        detections = sorted(found[image_id], key=lambda r: -r["score"])[:MAX_DETECTIONS]
        images.append(
            {
                "image_id": image_id,
                "file_name": info["file_name"],
                "width": info["width"],
                "height": info["height"],
                "truth": [
                    {
                        "bbox": [round(float(v), 1) for v in a["bbox"]],
                        "category": names[a["category_id"]],
                    }
                    for a in truth
                ],
                "detections": [
                    {
                        "bbox": [round(float(v), 1) for v in d["bbox"]],
                        "category": names.get(d["category_id"], str(d["category_id"])),
                        "score": round(float(d["score"]), 3),
                    }
                    for d in detections
                ],
            }
        )
    payload = json.dumps({"min_score": MIN_SCORE, "images": images}).encode()
    atomic_write(path, lambda f: f.write(payload))
    return path


def evaluation_ranges(
    spec: TrainSpec, dataset: CocoDetectionDataset
) -> dict[str, tuple[float, float]]:
    """The spec's extra area ranges, plus COCO's small/tiny/xsmall at the student's input
    size when every image of `dataset` is resized by one factor: AP_S counts boxes small at
    native size (COCO's rule), AP_S_input those small as the detector sees them."""
    from hmkd_core.data.summary import input_area_ranges

    sizes = [(img["width"], img["height"]) for img in dataset.coco.dataset["images"]]
    at_input = input_area_ranges(sizes, spec.student.min_size, spec.student.max_size)
    return {**spec.eval.extra_area_ranges, **at_input}


def evaluate_spec(
    spec: TrainSpec, out_dir: Path, reporter: Reporter | None = None
) -> dict[str, Any]:
    """Score `spec.student` (its `weights` name a trained file) on `spec.data.val`; no training.

    What an `evaluate` job runs: writes `eval.json` in `out_dir` and reports it, so a student
    can be measured on another split with the same metrics as its training run.
    """
    from hmkd_core.evaluation import write_eval_json
    from hmkd_core.models import build_detector
    from hmkd_core.models.export import check_trained_on

    if spec.data.val is None:
        raise ValueError("data.val: evaluation needs a validation split")
    reporter = reporter or Reporter()
    dataset = CocoDetectionDataset(spec.data.val.images, spec.data.val.annotations)
    check_trained_on(spec.student.weights, dataset.categories, same_classes=True)
    device = torch.device("cuda" if spec.runtime.device == "cuda" else "cpu")
    model = build_detector(spec.student, dataset.num_classes).to(device)
    metrics = evaluate_detector(
        model,
        dataset,
        device=device,
        batch_size=spec.eval.batch_size,
        extra_area_ranges=evaluation_ranges(spec, dataset),
    )
    assert metrics is not None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "eval.json"
    write_eval_json(metrics, path)
    reporter.on_evaluation(0, metrics)
    reporter.on_artifact("eval", path)
    return metrics
