"""COCO box AP for detectors, with extra (smaller) area ranges and per-category AP.

The library's claim is about small objects, and COCO's `small` range (< 32² px) lumps a 4 px
speck with a 30 px car. So besides the standard numbers this module reports AP for any extra
area ranges, evaluated in the same COCOeval run (they are appended to `params.areaRng`), and
reads every number straight from COCOeval's `precision`/`recall` arrays instead of parsing its
printout. pycocotools writes -1 where a range has no ground truth; that becomes `None` here,
because averaging a -1 into a results table is a silent, easy mistake.

`CocoEvaluator` follows detectron2's `reset / process / evaluate` life: the training loop feeds
it torchvision outputs batch by batch, and ranks can exchange its plain `results()` dicts.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hmkd_core.atomic import atomic_write
from hmkd_core.spec import check_area_ranges

logger = logging.getLogger(__name__)

# Where each standard metric lives in COCOeval's arrays: (area label, IoU threshold or None).
_STANDARD_AP = {
    "AP": ("all", None),
    "AP50": ("all", 0.5),
    "AP75": ("all", 0.75),
    "AP_S": ("small", None),
    "AP_M": ("medium", None),
    "AP_L": ("large", None),
}
_MAX_DETS = 100


class EvaluationError(ValueError):
    """Detections or settings that cannot be evaluated; the message says what to fix."""


@contextlib.contextmanager
def _quiet_pycocotools(step: str):
    """Swallow pycocotools' prints, replaying them at debug level for whoever wants them."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        text = buffer.getvalue().strip()
        if text:
            logger.debug("pycocotools %s:\n%s", step, text)


def summarize_coco(
    coco_gt: COCO,
    detections: list[dict],
    *,
    extra_area_ranges: Mapping[str, tuple[float, float]] | None = None,
    categories: list[dict] | None = None,
    image_ids: Iterable[int] | None = None,
) -> dict[str, Any]:
    """Box AP of `detections` against `coco_gt`, as one flat dict.

    detections: COCO result dicts (`image_id`, `category_id` in the dataset's own ids,
        `bbox` as [x, y, w, h] in original image pixels, `score`). May be empty.
    extra_area_ranges: name -> (min, max) object area in px², reported as `AP_<name>`.
    categories: the categories to evaluate and report (COCO category dicts with `id` and
        `name`); default all categories of `coco_gt`.
    image_ids: evaluate only these images (those actually run through the model); default all.
        Without it, images that were never processed would count as all-missed.

    Returns `AP, AP50, AP75, AP_S, AP_M, AP_L, AR@100`, `AP_<name>` per extra range (floats in
    [0, 1], or None where the range holds no ground truth) and `per_category`
    ({name: AP or None}, AP over IoU 0.5:0.95, all areas, 100 detections per image).
    """
    extra = _check_area_ranges(extra_area_ranges or {})
    cats = categories if categories is not None else coco_gt.loadCats(coco_gt.getCatIds())
    cat_ids = _check_categories(coco_gt, cats)
    img_ids = _check_image_ids(coco_gt, image_ids)
    results = _check_detections(coco_gt, detections)
    coco_gt = _matchable(coco_gt)

    with _quiet_pycocotools("loadRes"):
        coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt)
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    evaluator.params.catIds = cat_ids
    if img_ids is not None:
        evaluator.params.imgIds = img_ids
    for name, (low, high) in extra.items():
        evaluator.params.areaRng.append([float(low), float(high)])
        evaluator.params.areaRngLbl.append(name)
    with _quiet_pycocotools("evaluate"):
        evaluator.evaluate()
        evaluator.accumulate()
    if logger.isEnabledFor(logging.DEBUG):
        with _quiet_pycocotools("summary"):
            evaluator.summarize()
    return _read_metrics(evaluator, extra, {c["id"]: c["name"] for c in cats})


def _read_metrics(
    evaluator: COCOeval, extra: Mapping[str, tuple[float, float]], names: Mapping[int, str]
) -> dict[str, Any]:
    """Average COCOeval's accumulated arrays the way `COCOeval.summarize` does, -1 -> None."""
    params = evaluator.params
    precision = evaluator.eval["precision"]  # (IoU thresholds, recall points, K, areas, maxDets)
    recall = evaluator.eval["recall"]  # (IoU thresholds, K, areas, maxDets)
    m = list(params.maxDets).index(_MAX_DETS)

    def area(label: str) -> int:
        return list(params.areaRngLbl).index(label)

    def iou(threshold: float) -> int:
        return int(np.flatnonzero(np.isclose(params.iouThrs, threshold))[0])

    metrics: dict[str, Any] = {}
    for key, (label, threshold) in _STANDARD_AP.items():
        values = precision[:, :, :, area(label), m]
        metrics[key] = _mean_valid(values if threshold is None else values[iou(threshold)])
    metrics["AR@100"] = _mean_valid(recall[:, :, area("all"), m])
    for name in extra:
        metrics[f"AP_{name}"] = _mean_valid(precision[:, :, :, area(name), m])
    metrics["per_category"] = {
        names[cat_id]: _mean_valid(precision[:, :, k, area("all"), m])
        for k, cat_id in enumerate(params.catIds)
    }
    return metrics


def _mean_valid(values: np.ndarray) -> float | None:
    """Mean of the entries pycocotools filled in; None when it had no ground truth to fill."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def _matchable(coco_gt: COCO) -> COCO:
    """`coco_gt`, or a copy whose annotation of id 0 has an unused id instead.

    COCOeval records which ground truth a detection matched by the annotation's id, and reads
    0 as "unmatched": a box of id 0 (ids counted from 0) could never be found, and a detection
    of it counted as a false positive. The caller's index is left as it is."""
    if 0 not in coco_gt.anns:
        return coco_gt
    unused = max(coco_gt.anns) + 1
    renumbered = COCO()
    renumbered.dataset = {
        **coco_gt.dataset,
        "annotations": [
            {**a, "id": unused} if a["id"] == 0 else a for a in coco_gt.dataset["annotations"]
        ],
    }
    with _quiet_pycocotools("createIndex"):
        renumbered.createIndex()
    return renumbered


def _empty_results(coco_gt: COCO) -> COCO:
    """A result set with no detections (`COCO.loadRes` fails on an empty list)."""
    empty = COCO()
    empty.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    empty.createIndex()
    return empty


def _check_area_ranges(ranges: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    try:
        return check_area_ranges(ranges)
    except ValueError as e:
        raise EvaluationError(str(e)) from e


def _check_categories(coco_gt: COCO, categories: list[dict]) -> list[int]:
    known = set(coco_gt.getCatIds())
    ids = [c["id"] for c in categories]
    unknown = sorted(set(ids) - known)
    if unknown:
        raise EvaluationError(
            f"categories {unknown} are not in the ground truth (ids {sorted(known)}); "
            "pass categories from the same annotation file"
        )
    if not ids:
        raise EvaluationError("no categories to evaluate; the annotation file lists none")
    return ids


def _check_image_ids(coco_gt: COCO, image_ids: Iterable[int] | None) -> list[int] | None:
    if image_ids is None:
        return None
    ids = sorted({int(i) for i in image_ids})
    if not ids:
        raise EvaluationError("image_ids is empty: process at least one image before evaluating")
    unknown = sorted(set(ids) - set(coco_gt.getImgIds()))
    if unknown:
        raise EvaluationError(
            f"image ids {unknown[:10]} are not in the ground truth; the images and the "
            "annotation file do not belong together"
        )
    return ids


def _check_detections(coco_gt: COCO, detections: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Copy detections into plain-python result dicts (loadRes edits them in place)."""
    images = set(coco_gt.getImgIds())
    categories = set(coco_gt.getCatIds())
    results = []
    for n, det in enumerate(detections):
        missing = {"image_id", "category_id", "bbox", "score"} - det.keys()
        if missing:
            raise EvaluationError(f"detection {n} lacks {sorted(missing)}; got {det!r}")
        if det["image_id"] not in images:
            raise EvaluationError(
                f"detection {n} has image_id {det['image_id']}, which is not in the ground "
                "truth; the images and the annotation file do not belong together"
            )
        if det["category_id"] not in categories:
            raise EvaluationError(
                f"detection {n} has category_id {det['category_id']}, not a category of the "
                f"ground truth (ids {sorted(categories)}); map the model's contiguous labels "
                "back to dataset ids (CocoEvaluator does this)"
            )
        results.append(
            {
                "image_id": int(det["image_id"]),
                "category_id": int(det["category_id"]),
                "bbox": [float(v) for v in det["bbox"]],
                "score": float(det["score"]),
            }
        )
    return results


class CocoEvaluator:
    """Collects torchvision detector outputs over an evaluation pass and scores them.

    label_to_category_id: the model's contiguous labels (1..K; 0 is background) -> the
        dataset's category ids, the inverse of the mapping the dataset used for training.
    Boxes must already be in original image coordinates, which torchvision detectors return
    in eval mode (their transform maps them back).
    """

    def __init__(
        self,
        coco_gt: COCO,
        label_to_category_id: Mapping[int, int],
        *,
        extra_area_ranges: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        unknown = sorted(set(label_to_category_id.values()) - set(coco_gt.getCatIds()))
        if unknown:
            raise EvaluationError(
                f"label_to_category_id maps to category ids {unknown} that the ground truth "
                "lacks; build the mapping from the same annotation file"
            )
        self.coco_gt = coco_gt
        self.label_to_category_id = dict(label_to_category_id)
        self.extra_area_ranges = _check_area_ranges(extra_area_ranges or {})
        self._results: list[dict] = []
        self._image_ids: set[int] = set()

    def reset(self) -> None:
        """Forget everything processed; call before each evaluation pass."""
        self._results = []
        self._image_ids = set()

    def process(
        self,
        outputs: Sequence[Mapping[str, torch.Tensor]],
        targets_or_image_ids: Sequence[int | torch.Tensor | Mapping[str, Any]],
    ) -> None:
        """Record one batch.

        outputs: per image, `boxes` (N, 4) xyxy in original pixels, `labels` (N,) int64
            contiguous, `scores` (N,).
        targets_or_image_ids: per image, its dataset image id, as an int, a 0-d tensor or a
            target dict holding `image_id`.
        """
        if len(outputs) != len(targets_or_image_ids):
            raise EvaluationError(
                f"process() got {len(outputs)} outputs but {len(targets_or_image_ids)} image "
                "ids; pass one image id per output"
            )
        for output, target in zip(outputs, targets_or_image_ids, strict=True):
            image_id = _image_id(target)
            self._image_ids.add(image_id)
            self._results.extend(self._to_results(output, image_id))

    def _to_results(self, output: Mapping[str, torch.Tensor], image_id: int) -> list[dict]:
        boxes = output["boxes"].detach().float().cpu()
        labels = output["labels"].detach().cpu().tolist()
        scores = output["scores"].detach().float().cpu().tolist()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        results = []
        for box, label, score in zip(xywh, labels, scores, strict=True):
            if label not in self.label_to_category_id:
                raise EvaluationError(
                    f"model predicted label {label}, which label_to_category_id does not map "
                    f"(known labels {sorted(self.label_to_category_id)}); the model's "
                    "num_classes does not match the dataset"
                )
            results.append(
                {
                    "image_id": image_id,
                    "category_id": self.label_to_category_id[label],
                    "bbox": box,
                    "score": score,
                }
            )
        return results

    def results(self) -> list[dict]:
        """The COCO result dicts so far: plain python, ready to gather across ranks or dump."""
        return list(self._results)

    def image_ids(self) -> list[int]:
        """Ids of every image processed, including those with no detection."""
        return sorted(self._image_ids)

    def evaluate(
        self,
        extra_results: Iterable[Mapping[str, Any]] | None = None,
        *,
        extra_image_ids: Iterable[int] | None = None,
    ) -> dict[str, Any]:
        """Score what was processed here plus what other ranks gathered (see `summarize_coco`).

        Only processed images are evaluated: this rank's, those named in `extra_image_ids`, and
        those appearing in `extra_results` (pass `extra_image_ids` so that other ranks' images
        without any detection still count). Identical detections are kept once, so images
        that a distributed sampler padded onto two ranks are not counted twice.
        """
        extra_results = list(extra_results or [])
        image_ids = self._image_ids | {int(i) for i in extra_image_ids or []}
        image_ids |= {int(r["image_id"]) for r in extra_results}
        if not image_ids:
            raise EvaluationError("nothing to evaluate: call process() on some outputs first")
        return summarize_coco(
            self.coco_gt,
            _unique(self._results + extra_results),
            extra_area_ranges=self.extra_area_ranges,
            image_ids=image_ids,
        )


def _image_id(target: int | torch.Tensor | Mapping[str, Any]) -> int:
    if isinstance(target, Mapping):
        if "image_id" not in target:
            raise EvaluationError(f"target has no 'image_id' (keys {sorted(target)})")
        target = target["image_id"]
    if isinstance(target, torch.Tensor):
        if target.numel() != 1:
            raise EvaluationError(f"image_id tensor must hold one value, got shape {target.shape}")
        return int(target.item())
    return int(target)


def _unique(results: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Drop exact repeats (NMS never emits two identical boxes, so repeats are duplicates)."""
    seen: set[tuple] = set()
    unique = []
    for r in results:
        key = (r["image_id"], r["category_id"], tuple(r["bbox"]), r["score"])
        if key not in seen:
            seen.add(key)
            unique.append(dict(r))
    return unique


def write_eval_json(metrics: Mapping[str, Any], path: Path) -> None:
    """Write metrics as sorted-key JSON, atomically: readers never see a half-written file.

    The service and `hmkd` read `AP` and `AP_S` from the top level, so both must be there.
    """
    missing = [key for key in ("AP", "AP_S") if key not in metrics]
    if missing:
        raise EvaluationError(
            f"metrics lack top-level {missing}; pass the flat dict summarize_coco returns"
        )
    try:
        text = json.dumps(metrics, sort_keys=True, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise EvaluationError(
            f"metrics cannot be written as JSON ({err}); use plain floats/None, not NaN, inf "
            "or tensors"
        ) from err
    atomic_write(path, lambda f: f.write(text.encode()))
