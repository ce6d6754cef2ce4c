"""What a COCO split holds, checked the way the loader checks it, without reading a pixel.

The service runs this when a job is submitted (so a spec whose images do not match its
annotations is refused at once, not after its turn in the queue), and a job's log and
`hmkd datasets show` print it. Box sizes are counted in COCO's area ranges at the images'
native size, which is what AP_S and friends measure, and at the size the model sees after
`min_size`/`max_size` resizing, which is what "small" means to the detector.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hmkd_core.data.coco import (
    build_records,
    check_files_exist,
    check_images_open,
    clip_xywh_boxes,
    read_annotation_file,
)
from hmkd_core.data.transforms import MIN_BOX_SIDE

# COCO's area ranges (side of an equal-area square, in pixels), with the two finer ranges
# under small that the evaluation reports too.
SIZE_BINS: tuple[tuple[str, float, float], ...] = (
    ("tiny", 0, 8),
    ("xsmall", 8, 16),
    ("small", 16, 32),
    ("medium", 32, 96),
    ("large", 96, math.inf),
)


def size_bin(area: float) -> str:
    side = math.sqrt(max(area, 0.0))
    for name, low, high in SIZE_BINS:
        if low <= side < high:
            return name
    return SIZE_BINS[-1][0]


def resize_scale(width: float, height: float, min_size: int, max_size: int) -> float:
    """The factor torchvision's GeneralizedRCNNTransform resizes an image by."""
    short, long = min(width, height), max(width, height)
    return min(min_size / short, max_size / long)


@dataclass(frozen=True)
class CategoryCount:
    id: int
    name: str
    boxes: int


@dataclass(frozen=True)
class SplitSummary:
    images: int
    boxes: int  # non-crowd boxes the detector trains on
    crowd: int
    categories: list[CategoryCount]
    native_sizes: dict[str, int]  # boxes per size bin at native resolution
    input_sizes: dict[str, int] = field(default_factory=dict)  # at the model's input size
    images_without_boxes: int = 0
    dropped: int = 0  # non-crowd boxes the loader drops: nothing of them is left in the image

    @property
    def category_names(self) -> list[tuple[int, str]]:
        """(id, name) of each category in id order, as `coco.category_names` gives them."""
        return [(c.id, c.name) for c in self.categories]

    @property
    def empty_categories(self) -> list[CategoryCount]:
        return [c for c in self.categories if c.boxes == 0]

    def warnings(self, split: str) -> list[str]:
        """What a user should know before training on this split (nothing fatal)."""
        found = []
        for c in self.empty_categories:
            found.append(
                f"data.{split}: category {c.id} {c.name!r} has no boxes; it is still a class "
                "the detector learns (and its AP is undefined): remove it from the annotation "
                "file if it is a placeholder"
            )
        if self.dropped:
            found.append(
                f"data.{split}: {self.dropped} box(es) dropped: under {MIN_BOX_SIDE:g} px a side "
                "once clipped to their image (a zero or negative width or height, or a box "
                "outside the image); "
                + (
                    "the detector never sees them"
                    if split == "train"
                    else "evaluation still counts them as objects, which no detection matches"
                )
            )
        if self.images and self.boxes == 0:
            found.append(
                f"data.{split}: no boxes at all; "
                + (
                    "the detector learns only background"
                    if split == "train"
                    else "every AP is undefined (None) and no best checkpoint is kept"
                )
            )
        return found

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_split(
    images: Path | str,
    annotations: Path | str,
    *,
    input_size: tuple[int, int] | None = None,
) -> SplitSummary:
    """Check a split as `CocoDetectionDataset` does (DatasetError naming the file and entry)
    and count what it holds. `input_size` is `(min_size, max_size)` of the model's resize."""
    images_dir, source = Path(images), Path(annotations)
    data = read_annotation_file(source)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    records, report = build_records(data, images_dir, label_of)
    check_files_exist(records, images_dir, source)
    check_images_open(records, source)
    per_category: Counter[int] = Counter()
    native: Counter[str] = Counter()
    at_input: Counter[str] = Counter()
    boxed_images: set[int] = set()
    sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
    plain = [ann for ann in data["annotations"] if not ann["iscrowd"]]
    width, height = np.array([sizes[ann["image_id"]] for ann in plain]).reshape(-1, 2).T
    xywh = np.array([ann["bbox"] for ann in plain], dtype=np.float64)
    _, kept, _ = clip_xywh_boxes(xywh, width=width, height=height)
    for ann, keep in zip(plain, kept.tolist(), strict=True):
        if not keep:  # the loader drops it: the detector never sees it
            continue
        per_category[ann["category_id"]] += 1
        boxed_images.add(ann["image_id"])
        native[size_bin(ann["area"])] += 1
        if input_size is not None:
            scale = resize_scale(*sizes[ann["image_id"]], *input_size)
            at_input[size_bin(ann["area"] * scale * scale)] += 1
    order = [name for name, _, _ in SIZE_BINS]
    return SplitSummary(
        images=len(records),
        boxes=sum(per_category.values()),
        crowd=report["crowd"],
        categories=[
            CategoryCount(c["id"], str(c.get("name", c["id"])), per_category[c["id"]])
            for c in categories
        ],
        native_sizes={name: native[name] for name in order},
        input_sizes={name: at_input[name] for name in order} if input_size else {},
        images_without_boxes=len(records) - len(boxed_images),
        dropped=len(plain) - int(kept.sum()),
    )


INPUT_SUFFIX = "_input"


def input_area_ranges(
    sizes: list[tuple[float, float]], min_size: int, max_size: int
) -> dict[str, tuple[float, float]]:
    """COCO's small range and the two finer ones under it, measured at the model's input:
    `{"S_input": (0, (32/s)^2), "tiny_input": ..., "xsmall_input": ...}` in native pixels^2,
    where s is the factor every image is resized by. Reported as AP_S_input etc. beside COCO's
    native-size AP_S. Empty when the images are resized by different factors (COCOeval's area
    ranges cannot vary per image)."""
    if not sizes:
        return {}
    scales = [resize_scale(w, h, min_size, max_size) for w, h in sizes]
    low, high = min(scales), max(scales)
    if high > low * 1.01:
        return {}
    s = (low + high) / 2
    return {
        f"S{INPUT_SUFFIX}": (0.0, (32.0 / s) ** 2),
        f"tiny{INPUT_SUFFIX}": (0.0, (8.0 / s) ** 2),
        f"xsmall{INPUT_SUFFIX}": ((8.0 / s) ** 2, (16.0 / s) ** 2),
    }
