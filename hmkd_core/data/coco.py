"""COCO-format detection datasets, checked in full when they are opened.

A training run that dies at iteration 40,000 on a missing file or a dangling ``image_id`` wastes
a GPU-day, so everything that can be checked cheaply is checked at construction: the JSON parses,
every annotation points at a known image and category, every image file exists. Box cleaning
(clip to the image, drop what is left without area) also happens once, up front, and is
reported once, instead of silently per item.

Labels: torchvision detectors reserve label 0 for background and want 1..K, while COCO category
ids are arbitrary (often non-contiguous, sometimes 0). Label ``k`` is the k-th category in
ascending id order; `CocoDetectionDataset.label_to_category_id` maps predictions back.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors

from hmkd_core.data.transforms import MIN_BOX_SIDE, build_transforms, has_random_transforms

log = logging.getLogger("hmkd_core.data")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the file and the entry."""


@dataclass(frozen=True)
class _ImageRecord:
    """What `__getitem__` needs for one image, prepared once at construction."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32, XYXY pixels, clipped, all with side >= MIN_BOX_SIDE
    labels: np.ndarray  # (N,) int64 in 1..K


# --------------------------------------------------------------------------- annotation file


def read_annotation_file(path: Path | str) -> dict[str, Any]:
    """Parse and validate a COCO annotation file, filling ``area``/``iscrowd``/``name`` where
    absent.

    pycocotools trusts its input: a dangling ``image_id`` or a duplicate id surfaces later as a
    KeyError deep inside evaluation. This checks the structure first so the error names the file
    and the entry. Missing ``area`` becomes the box area and missing ``iscrowd`` becomes 0, the
    COCO defaults `COCOeval` needs; a category without a ``name`` is named by its id, since
    per-category AP is reported by name. Present values are never changed.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, or a FIFO whose read would block
        raise DatasetError(f"{path}: cannot read annotation file: not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read annotation file: {err.strerror}") from None
    try:
        # JSON's own encodings, told apart as RFC 8259 says (UTF-8 with or without a byte
        # order mark, UTF-16 and UTF-32 as some Windows tools write them)
        data = json.loads(raw)
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"{path}: not UTF-8 (byte {err.start}: {err.reason}); save the file as UTF-8"
        ) from None
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"{path}: not valid JSON at line {err.lineno} column {err.colno} (char {err.pos}): "
            f"{err.msg}; fix the file or regenerate it"
        ) from None
    except RecursionError:
        raise DatasetError(f"{path}: JSON nested too deeply to be a COCO file") from None
    except ValueError:  # json.loads' only other error: an integer Python will not convert
        raise DatasetError(
            f"{path}: cannot be parsed as JSON: it holds an integer of more than "
            f"{sys.get_int_max_str_digits()} digits, which no COCO field needs"
        ) from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a COCO annotation file is a JSON object at the top level")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(
                f"{path}: missing or non-list key {key!r}; a COCO file needs 'images', "
                "'annotations' and 'categories' lists (an empty 'annotations' list is fine)"
            )
    for key in ("images", "categories"):  # nothing to train on, or no class to learn or score
        if not data[key]:
            raise DatasetError(f"{path}: lists no {key}; a split needs at least one")
    images = _index_by_id(data["images"], "image", path)
    for image in images.values():
        _check_image_entry(image, path)
    categories = _index_by_id(data["categories"], "category", path)
    named: dict[str, int] = {}
    for category in categories.values():
        name = category.setdefault("name", str(category["id"]))
        if not isinstance(name, str) or not _plain_text(name):
            raise DatasetError(
                f"{path}: category id {category['id']}: 'name' must be text without control "
                "or unencodable characters"
            )
        if name in named:  # per-category AP is reported by name: one would hide the other
            raise DatasetError(
                f"{path}: category ids {named[name]} and {category['id']} are both named "
                f"{name!r}; give each category its own name (or merge them into one id)"
            )
        named[name] = category["id"]
    annotation_ids: set[int] = set()
    for position, ann in enumerate(data["annotations"]):
        _check_annotation(ann, position, images, categories, path)
        if ann["id"] in annotation_ids:
            raise DatasetError(
                f"{path}: annotation id {ann['id']} appears twice; ids must be unique"
            )
        annotation_ids.add(ann["id"])
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _index_by_id(entries: list[Any], kind: str, path: Path) -> dict[int, dict[str, Any]]:
    by_id: dict[int, dict[str, Any]] = {}
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or not _is_int(entry.get("id")):
            raise DatasetError(f"{path}: {kind} entry #{position} has no integer 'id'")
        if entry["id"] in by_id:
            raise DatasetError(f"{path}: {kind} id {entry['id']} appears twice; ids must be unique")
        by_id[entry["id"]] = entry
    return by_id


def _plain_text(value: str) -> bool:
    """Text a name may be: encodable (no lone surrogates from a `\\udcff` escape) and free of
    control characters, which no file or class name needs and a database may refuse."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in value)


def _finite(value: Any) -> bool:
    """A JSON number that is a finite float (an integer of 400 digits is not)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _check_image_entry(image: dict[str, Any], path: Path) -> None:
    where = f"{path}: image id {image['id']}"
    if not isinstance(image.get("file_name"), str) or not image["file_name"]:
        raise DatasetError(f"{where}: needs a 'file_name' string")
    if not _plain_text(image["file_name"]):
        raise DatasetError(f"{where}: 'file_name' holds control or unencodable characters")
    for key in ("width", "height"):
        if not _is_int(image.get(key)) or image[key] <= 0:
            raise DatasetError(
                f"{where}: needs a positive integer {key!r} (got {image.get(key)!r})"
            )
    if image["width"] * image["height"] > max_image_pixels():
        raise DatasetError(
            f"{where}: 'width' x 'height' is more pixels than the {max_image_pixels():.0f} "
            "an image may have (PIL refuses to decode more, as a decompression bomb); tile or "
            "downscale the image"
        )


def max_image_pixels() -> float:
    """The most pixels an image file may hold: PIL refuses to decode more than twice its
    `Image.MAX_IMAGE_PIXELS` (a decompression-bomb guard; None turns it off)."""
    limit = Image.MAX_IMAGE_PIXELS
    return math.inf if limit is None else 2.0 * limit


def _check_annotation(
    ann: Any,
    position: int,
    images: dict[int, dict[str, Any]],
    categories: dict[int, dict[str, Any]],
    path: Path,
) -> None:
    if not isinstance(ann, dict) or not _is_int(ann.get("id")):
        raise DatasetError(f"{path}: annotation #{position} has no integer 'id'")
    where = f"{path}: annotation id {ann['id']}"
    if not _is_int(ann.get("image_id")) or ann["image_id"] not in images:
        raise DatasetError(
            f"{where}: image_id {ann.get('image_id')!r} is not in 'images'; "
            "add the image entry or remove the annotation"
        )
    if not _is_int(ann.get("category_id")) or ann["category_id"] not in categories:
        raise DatasetError(
            f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'; "
            f"known ids: {sorted(categories)}"
        )
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_finite(v) for v in bbox):
        raise DatasetError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    if "area" in ann and (not _finite(ann["area"]) or ann["area"] < 0):
        raise DatasetError(f"{where}: 'area' must be a finite number >= 0, got {ann['area']!r}")
    if ann.get("iscrowd", 0) not in (0, 1):
        raise DatasetError(f"{where}: 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")


def category_names(categories: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(id, name) of each category in id order: what a detector's labels 1..K stand for, so
    what two splits, or a split and a trained model, must agree on (a `supercategory` or
    other key does not matter)."""
    ordered = sorted(categories, key=lambda c: c["id"])
    return [(c["id"], str(c.get("name", c["id"]))) for c in ordered]


def check_same_categories(
    train: list[tuple[int, str]], val: list[tuple[int, str]], val_file: Path | str
) -> None:
    """Evaluation maps the detector's labels to category ids through the training split's
    categories (`category_names` of each): a validation file listing others would be scored
    against the wrong classes. One rule for the submit check and the trainer."""
    if train != val:
        raise DatasetError(
            f"{val_file}: categories {val} differ from the training split's {train}; "
            "both splits must list the same categories (ids and names)"
        )


def coco_from_dict(data: dict[str, Any]) -> COCO:
    """A pycocotools `COCO` index over already-parsed data (no second read, no chatter)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# --------------------------------------------------------------------------- boxes


def clip_xywh_boxes(
    xywh: np.ndarray, *, width: int | np.ndarray, height: int | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convert COCO (N, 4) xywh boxes to XYXY clipped to the image (or, given (N,) widths and
    heights, each to its own image).

    Returns ``(xyxy (N, 4) float32, keep (N,) bool, clipped (N,) bool)``: ``keep`` is false for
    boxes left with a side under ``MIN_BOX_SIDE`` (the rule `SanitizeBoundingBoxes` applies
    later anyway, so counting it here keeps the report honest); ``clipped`` marks kept boxes
    that clipping changed.
    """
    xywh = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    limits = np.array([width, height, width, height], dtype=np.float64).T
    clipped_xyxy = np.clip(xyxy, 0.0, limits)
    sides = clipped_xyxy[:, 2:] - clipped_xyxy[:, :2]
    keep = (sides >= MIN_BOX_SIDE).all(axis=1)
    changed = (clipped_xyxy != xyxy).any(axis=1) & keep
    return clipped_xyxy.astype(np.float32), keep, changed


def build_records(
    data: dict[str, Any], images_dir: Path, category_id_to_label: dict[int, int]
) -> tuple[dict[int, _ImageRecord], dict[str, int]]:
    """One `_ImageRecord` per image plus the ``box_report`` counts (clipped, dropped, crowd)."""
    per_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in data["images"]}
    report = {"clipped": 0, "dropped": 0, "crowd": 0}
    for ann in data["annotations"]:
        if ann["iscrowd"]:
            report["crowd"] += 1
        else:
            per_image[ann["image_id"]].append(ann)
    records = {}
    for img in data["images"]:
        anns = per_image[img["id"]]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        xyxy, keep, clipped = clip_xywh_boxes(xywh, width=img["width"], height=img["height"])
        labels = np.array([category_id_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        report["clipped"] += int(clipped.sum())
        report["dropped"] += int((~keep).sum())
        records[img["id"]] = _ImageRecord(
            image_id=img["id"],
            path=image_path(images_dir, img["file_name"], img["id"]),
            width=img["width"],
            height=img["height"],
            boxes=xyxy[keep],
            labels=labels[keep],
        )
    return records, report


def image_path(images_dir: Path, file_name: str, image_id: int) -> Path:
    """The image's path, refused when `file_name` leads out of the image folder: a dataset
    confined to allowed roots must not reach files elsewhere through its annotations."""
    try:
        root = images_dir.resolve()
        path = (root / file_name).resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop: a RuntimeError before Python 3.13
        reason = getattr(err, "strerror", None) or "a symlink loop"
        raise DatasetError(
            f"image id {image_id}: file_name {file_name!r} cannot be opened in the images "
            f"folder {images_dir}: {reason}"
        ) from None
    if not path.is_relative_to(root):
        raise DatasetError(
            f"image {image_id}: file_name {file_name!r} points outside {images_dir}; "
            "file names must be relative paths inside the image folder"
        )
    return path


def check_files_exist(records: dict[int, _ImageRecord], images_dir: Path, source: Path) -> None:
    missing = []
    for record in records.values():
        try:
            if not record.path.is_file():
                missing.append(record)
        except OSError as err:  # a name too long for the file system, a folder it may not read
            raise DatasetError(
                f"{source}: image id {record.image_id}: file {record.path} cannot be opened in "
                f"the images folder: {err.strerror}"
            ) from None
    if not missing:
        return
    first = missing[0]
    hint = (
        f"the images folder {images_dir} does not exist"
        if not images_dir.is_dir()
        else "check the images folder and the 'file_name' entries"
    )
    more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
    raise DatasetError(
        f"{source}: image id {first.image_id}: file {first.path} not found{more}; {hint}"
    )


def _log_box_report(report: dict[str, int], source: Path) -> None:
    message = (
        "%s: %d box(es) clipped to their image, %d dropped (under %g px a side after "
        "clipping), %d crowd box(es) kept out of training targets"
    )
    args = (source, report["clipped"], report["dropped"], MIN_BOX_SIDE, report["crowd"])
    if report["clipped"] or report["dropped"]:
        log.warning(message, *args)
    elif report["crowd"]:
        log.info(message, *args)  # crowd regions are normal COCO; evaluation still uses them


# --------------------------------------------------------------------------- images


def load_rgb_image(path: Path | str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode an image file to a (3, H, W) float32 tensor in [0, 1], whatever its mode.

    Grayscale, palette and alpha images become RGB (alpha dropped). 16-bit grayscale (PIL
    modes ``I;16*`` and ``I``) is scaled by 1/65535 — converting it through 8-bit PIL modes
    would clip everything above 255 to white. `size` is the (width, height) the annotation
    declares: a photo whose EXIF orientation swaps its sides is turned when `size` is that of
    the turned photo (`upright`).
    """
    with Image.open(path) as img:
        img = upright(img, size)
        if img.mode in _SIXTEEN_BIT_MODES:
            gray = np.asarray(img).astype(np.float32) / 65535.0
            rgb = np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=2)
        elif img.mode == "F":
            gray = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)  # taken as [0, 1]
            rgb = np.repeat(gray[..., None], 3, axis=2)
        else:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


# EXIF orientations that swap width and height, and the turn that shows the photo upright
_SIDE_SWAPPING = {
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _turn(img: Image.Image, size: tuple[int, int] | None) -> Image.Transpose | None:
    """The turn `upright` applies to `img`, or None."""
    if size is None or img.size == size or img.size[::-1] != size:
        return None
    try:
        orientation = img.getexif().get(0x0112)  # the Orientation tag
    except Exception:  # PIL's EXIF parser raises many kinds on broken camera metadata
        return None
    return _SIDE_SWAPPING.get(orientation) if isinstance(orientation, int) else None


def upright(img: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    """`img` turned by its EXIF orientation when that swaps its sides and `size` (the
    annotation's width, height) is the turned photo's; else `img` as stored.

    Annotation tools disagree: some draw boxes on the stored pixels, others on the photo as
    viewers show it. Where the orientation swaps the sides, the declared size tells which one
    the boxes were drawn on. Where it does not (upside down, mirrored) nothing tells, and the
    stored pixels are read, as torchvision's own reader reads them. A malformed EXIF block is
    read as no orientation: the pixels are still the image."""
    turn = _turn(img, size)
    return img.transpose(turn) if turn is not None else img


def check_images_open(records: dict[int, _ImageRecord], source: Path) -> None:
    """Every image's header opens and gives the size its annotation declares (after the turn
    `upright` would apply), read without decoding the pixels: a file that is not an image,
    or of another size, then fails the check before training instead of the job after it
    queued. A file whose header is sound but whose pixels are truncated still fails only
    when decoded."""
    problems = []
    for record in records.values():
        declared = (record.width, record.height)
        try:
            with Image.open(record.path) as img:
                size = img.size[::-1] if _turn(img, declared) is not None else img.size
        except Exception as err:  # PIL's parsers raise many kinds (SyntaxError among them)
            problems.append(
                f"image id {record.image_id}: file {record.path} in the images folder cannot "
                f"be decoded ({type(err).__name__}: {err}); replace or remove it"
            )
            continue
        if size != declared:
            problems.append(
                f"image id {record.image_id}: {record.path} is {size[0]}x{size[1]} but the "
                f"annotation says {declared[0]}x{declared[1]}; fix 'width'/'height' or the file"
            )
    if problems:
        more = f" ({len(problems) - 1} more image(s) with a problem)" if len(problems) > 1 else ""
        raise DatasetError(f"{source}: {problems[0]}{more}")


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """A stable 63-bit seed for one sample's random transforms.

    A hash of (seed, epoch, index) rather than a worker-local RNG: a resumed run, or one with a
    different ``num_workers``, must see exactly the same augmented samples. (Python's `hash` is
    not used: it is salted per process for strings and differs across platforms.)
    """
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------- dataset


class CocoDetectionDataset(Dataset):
    """A COCO-format split as torchvision detectors want it: ``(image, target)`` pairs.

    ``image`` is a ``tv_tensors.Image`` (3, H, W) float32 in [0, 1]; ``target`` holds
    ``boxes`` (``tv_tensors.BoundingBoxes`` (N, 4) XYXY float32, ``canvas_size=(H, W)``),
    ``labels`` (N,) int64 in 1..K and ``image_id`` (int). Crowd annotations stay out of
    targets but remain in ``self.coco``, the untouched ground truth evaluation reads.
    """

    def __init__(
        self,
        images: Path | str,
        annotations: Path | str,
        *,
        train: bool = False,
        hflip: bool = False,
        seed: int = 0,
    ) -> None:
        self.images_dir = Path(images)
        self.annotation_file = Path(annotations)
        data = read_annotation_file(self.annotation_file)
        self.coco = coco_from_dict(data)
        self.categories: list[dict[str, Any]] = sorted(data["categories"], key=lambda c: c["id"])
        self.label_to_category_id = {i + 1: c["id"] for i, c in enumerate(self.categories)}
        self.category_id_to_label = {cid: lab for lab, cid in self.label_to_category_id.items()}
        self.num_classes = len(self.categories) + 1
        self.image_ids: list[int] = sorted(img["id"] for img in data["images"])
        self._records, self.box_report = build_records(
            data, self.images_dir, self.category_id_to_label
        )
        check_files_exist(self._records, self.images_dir, self.annotation_file)
        _log_box_report(self.box_report, self.annotation_file)
        self.train = train
        self.hflip = hflip
        self.seed = seed
        self.epoch = 0
        self.transforms = build_transforms(train=train, hflip=hflip)
        self._random = has_random_transforms(train=train, hflip=hflip)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws `__getitem__` reproduces."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        record = self._records[self.image_ids[index]]
        try:
            pixels = load_rgb_image(record.path, (record.width, record.height))
        except (OSError, Image.DecompressionBombError) as err:  # UnidentifiedImageError too
            raise DatasetError(
                f"{self.annotation_file}: image id {record.image_id}: cannot decode "
                f"{record.path}: {err}; replace or remove the file"
            ) from None
        if tuple(pixels.shape[1:]) != (record.height, record.width):
            raise DatasetError(
                f"{self.annotation_file}: image id {record.image_id}: {record.path} is "
                f"{pixels.shape[2]}x{pixels.shape[1]} but the annotation says "
                f"{record.width}x{record.height}; fix 'width'/'height' or the file"
            )
        image = tv_tensors.Image(pixels)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(record.boxes.copy()),
                format=tv_tensors.BoundingBoxFormat.XYXY,
                canvas_size=(record.height, record.width),
            ),
            "labels": torch.from_numpy(record.labels.copy()),
            "image_id": record.image_id,
        }
        if not self._random:
            return self.transforms(image, target)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augmentation_seed(self.seed, self.epoch, index))
            return self.transforms(image, target)
