"""SmallDigits: a small-object detection benchmark built in seconds from bundled handwriting.

COCO needs ~20 GB and GPU-days; this needs scikit-learn's 1,797 real 8x8 handwritten digits
(`sklearn.datasets.load_digits`, no download). Each image is a textured canvas with clutter —
strokes, soft blobs, digit-like scribbles and *unannotated* fragments of real digits — and a
few digits scaled to 8-28 px, so most objects are COCO-small (area < 32^2) and the background
is full of near-misses: the regime the distillation methods target.

Guarantees the benchmark relies on:
- Handwriting is split once by a seeded permutation: training images draw from the first 80%
  of the samples, validation images from the disjoint rest (``info.sample_indices`` lists each
  split's pool; ``annotations[].source.sample`` the sample each digit came from).
- Boxes are tight around the ink after resize and rotation, not around the paste rectangle.
- Same arguments, same bytes: every image has its own NumPy generator seeded from
  (seed, split, index); the global RNGs are never used.

Categories: ids 1..10 named ``digit_0``..``digit_9`` (id = digit + 1), so no category has id 0.
Image ids start at 1 and file names repeat them (``000001.png``). ``area`` is the box area.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from sklearn.datasets import load_digits

CATEGORY_NAMES = tuple(f"digit_{d}" for d in range(10))
TRAIN_FRACTION = 0.8
INK_THRESHOLD = 0.2  # sprite alpha below this is not ink: not drawn, not inside the box
INK_GAIN = 2.0  # sklearn samples are faint counts 0..16; the gain makes strokes solid
MAX_ROTATION_DEG = 8.0
MAX_OVERLAP = 0.1  # intersection / smaller box area allowed between two digits
SMALL_AREA = 32.0**2
_BILINEAR = Image.Resampling.BILINEAR
_SPLITS = ("train", "val")


@dataclass(frozen=True)
class _Settings:
    size: int
    min_digits: int
    max_digits: int
    min_side: int
    max_side: int


@dataclass(frozen=True)
class _PlacedDigit:
    alpha: np.ndarray  # (h, w) float32 sprite, cropped tight to ink
    x: int
    y: int
    label: int  # the digit 0..9
    source: dict[str, Any]

    @property
    def xyxy(self) -> tuple[int, int, int, int]:
        h, w = self.alpha.shape
        return self.x, self.y, self.x + w, self.y + h

    def annotation(self, ann_id: int, image_id: int) -> dict[str, Any]:
        """The COCO entry: the sprite is cropped to its ink, so its extent is the tight box."""
        h, w = self.alpha.shape
        return {
            "id": ann_id,
            "image_id": image_id,
            "category_id": self.label + 1,
            "bbox": [float(self.x), float(self.y), float(w), float(h)],
            "area": float(w * h),
            "iscrowd": 0,
            "source": self.source,
        }


# --------------------------------------------------------------------------- sprites


def render_digit(sample: np.ndarray, *, side: int, angle: float) -> np.ndarray:
    """Render one (8, 8) digit sample (values 0..16) as an ink alpha map cropped to its ink.

    The sample is scaled to ``side`` x ``side`` (bilinear), rotated by ``angle`` degrees, and
    alpha under ``INK_THRESHOLD`` is zeroed before cropping, so the returned (h, w) float32 map
    in [0, 1] has ink on each of its four border lines: the sprite's extent *is* the tight box.
    """
    ink = np.asarray(sample, dtype=np.float32)
    peak = float(ink.max())
    if peak <= 0.0:
        raise ValueError("the digit sample has no ink (all zeros)")
    img = Image.fromarray(np.clip(ink / peak * INK_GAIN, 0.0, 1.0)).resize((side, side), _BILINEAR)
    if angle:
        img = img.rotate(angle, resample=_BILINEAR, expand=True, fillcolor=0.0)
    alpha = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    alpha = np.where(alpha >= INK_THRESHOLD, alpha, np.float32(0.0))
    rows = np.flatnonzero(alpha.any(axis=1))
    cols = np.flatnonzero(alpha.any(axis=0))
    if rows.size == 0:
        raise ValueError(f"no ink left after rendering at side {side}; use a larger side")
    return np.ascontiguousarray(alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])


def digit_sample_split(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, val) pools of sample indices: a seeded permutation cut at 80%."""
    order = np.random.default_rng(seed).permutation(num_samples)
    cut = round(num_samples * TRAIN_FRACTION)
    return np.sort(order[:cut]), np.sort(order[cut:])


# --------------------------------------------------------------------------- painting


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32))


def _blend(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray, x: int, y: int) -> None:
    """Paint ``colour`` through ``alpha`` (h, w) at (x, y) on canvas (S, S, 3), clipped."""
    size_y, size_x = canvas.shape[:2]
    h, w = alpha.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, size_x), min(y + h, size_y)
    if x0 >= x1 or y0 >= y1:
        return
    a = alpha[y0 - y : y1 - y, x0 - x : x1 - x, None]
    region = canvas[y0:y1, x0:x1]
    canvas[y0:y1, x0:x1] = region * (1.0 - a) + colour * a


def _pick_colour(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    """A random RGB colour at least a random luminance gap away from the region's mean."""
    background = _luminance(region.reshape(-1, 3).mean(axis=0))
    wanted = rng.uniform(0.2, 0.5)
    best, best_gap = np.zeros(3, dtype=np.float32), -1.0
    for _ in range(24):
        colour = rng.random(3).astype(np.float32)
        gap = abs(_luminance(colour) - background)
        if gap >= wanted:
            return colour
        if gap > best_gap:
            best, best_gap = colour, gap
    return best


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    grid = rng.normal(0.0, amplitude, size=(cells + 1, cells + 1, 3)).astype(np.float32)
    channels = [
        np.asarray(Image.fromarray(grid[..., c]).resize((size, size), Image.Resampling.BICUBIC))
        for c in range(3)
    ]
    return np.stack(channels, axis=-1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) float32 canvas: base colour + gradient + coarse/fine noise + grain."""
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = rng.uniform(0.15, 0.85, size=3)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    ramp = np.add.outer(np.arange(size) * np.sin(theta), np.arange(size) * np.cos(theta))
    ramp = (ramp - ramp.mean()) / size
    canvas += ramp[..., None].astype(np.float32) * rng.uniform(-0.4, 0.4, size=3).astype(np.float32)
    canvas += _smooth_noise(rng, size, int(rng.integers(2, 6)), rng.uniform(0.04, 0.15))
    canvas += _smooth_noise(rng, size, int(rng.integers(12, 33)), rng.uniform(0.01, 0.05))
    canvas += rng.normal(0.0, rng.uniform(0.005, 0.025), size=canvas.shape).astype(np.float32)
    return np.clip(canvas, 0.0, 1.0)


def _polyline_alpha(points: np.ndarray, width: int) -> tuple[np.ndarray, int, int]:
    """Rasterise a polyline (K, 2) into a local alpha patch; returns (alpha, x0, y0)."""
    x0 = int(np.floor(points[:, 0].min())) - width
    y0 = int(np.floor(points[:, 1].min())) - width
    w = int(np.ceil(points[:, 0].max())) + width + 1 - x0
    h = int(np.ceil(points[:, 1].max())) + width + 1 - y0
    mask = Image.new("L", (w, h), 0)
    local = [(float(px - x0), float(py - y0)) for px, py in points]
    ImageDraw.Draw(mask).line(local, fill=255, width=width, joint="curve")
    return np.asarray(mask, dtype=np.float32) / 255.0, x0, y0


# --------------------------------------------------------------------------- one image


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box's area (0 when apart)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _find_spot(
    rng: np.random.Generator,
    shape: tuple[int, int],
    size: int,
    taken: list[tuple[int, int, int, int]],
    max_overlap: float,
    margin: int = 0,
) -> tuple[int, int] | None:
    h, w = shape
    for _ in range(50):
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        box = (x - margin, y - margin, x + w + margin, y + h + margin)
        if all(_overlap(box, other) <= max_overlap for other in taken):
            return x, y
    return None


def _draw_side(rng: np.random.Generator, s: _Settings) -> int:
    """Digit side in pixels, skewed small: u^2 puts ~70% in the lower half of the range."""
    return s.min_side + round((s.max_side - s.min_side) * rng.random() ** 2)


def _plan_digits(
    rng: np.random.Generator, pool: np.ndarray, digits: Any, s: _Settings
) -> list[_PlacedDigit]:
    placed: list[_PlacedDigit] = []
    for _ in range(int(rng.integers(s.min_digits, s.max_digits + 1))):
        sample = int(pool[rng.integers(len(pool))])
        side = _draw_side(rng, s)
        angle = round(float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)), 2)
        alpha = render_digit(digits.images[sample], side=side, angle=angle)
        spot = _find_spot(rng, alpha.shape, s.size, [p.xyxy for p in placed], MAX_OVERLAP)
        if spot is None:  # a crowded canvas: fewer digits rather than heavy overlap
            continue
        source = {"sample": sample, "side": side, "angle": angle}
        placed.append(_PlacedDigit(alpha, spot[0], spot[1], int(digits.target[sample]), source))
    return placed


def _fragment_alpha(
    rng: np.random.Generator, pool: np.ndarray, digits: Any, s: _Settings
) -> np.ndarray | None:
    """A cropped piece (at most 5x5 of 8x8) of a real digit, scaled and turned like digits."""
    sample = digits.images[int(pool[rng.integers(len(pool))])]
    h, w = int(rng.integers(3, 6)), int(rng.integers(3, 6))
    top, left = int(rng.integers(0, 9 - h)), int(rng.integers(0, 9 - w))
    piece = sample[top : top + h, left : left + w]
    if piece.max() <= 0:
        return None
    scale = _draw_side(rng, s) / 8.0
    img = Image.fromarray(np.clip(piece / piece.max() * INK_GAIN, 0, 1).astype(np.float32))
    img = img.resize((max(2, round(w * scale)), max(2, round(h * scale))), _BILINEAR)
    img = img.rotate(float(rng.uniform(0, 360)), resample=_BILINEAR, expand=True, fillcolor=0.0)
    alpha = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    return np.where(alpha >= INK_THRESHOLD, alpha, np.float32(0.0))


def _draw_clutter(
    rng: np.random.Generator,
    canvas: np.ndarray,
    digit_boxes: list[tuple[int, int, int, int]],
    pool: np.ndarray,
    digits: Any,
    s: _Settings,
) -> None:
    """Unannotated distractors. Digit-like ones (scribbles, fragments) keep off the digits so a
    digit's box stays its own; strokes and soft blobs may cross anything, as occluders do."""
    size = s.size
    for _ in range(int(rng.integers(1, 5))):  # soft blobs
        mask = Image.new("L", (size, size), 0)
        cx, cy = rng.uniform(0, size, size=2)
        rx, ry = rng.uniform(3, 18, size=2)
        ImageDraw.Draw(mask).ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
        mask = mask.filter(ImageFilter.GaussianBlur(float(rng.uniform(1, 4))))
        alpha = np.asarray(mask, dtype=np.float32) / 255.0 * rng.uniform(0.2, 0.6)
        _blend(canvas, alpha, rng.random(3).astype(np.float32), 0, 0)
    for _ in range(int(rng.integers(2, 7))):  # long strokes
        points = rng.uniform(0, size, size=(int(rng.integers(2, 4)), 2))
        alpha, x0, y0 = _polyline_alpha(points, int(rng.integers(1, 4)))
        _blend(canvas, alpha * rng.uniform(0.3, 0.8), rng.random(3).astype(np.float32), x0, y0)
    for _ in range(int(rng.integers(1, 5))):  # digit-sized scribbles
        steps = rng.normal(0, rng.uniform(3, 8), size=(int(rng.integers(4, 9)), 2))
        points = np.cumsum(steps, axis=0)
        alpha, _, _ = _polyline_alpha(points, int(rng.integers(1, 3)))
        _paste_away_from_digits(rng, canvas, alpha, digit_boxes, size)
    for _ in range(int(rng.integers(2, 7))):  # fragments of real digits
        alpha = _fragment_alpha(rng, pool, digits, s)
        if alpha is not None:
            _paste_away_from_digits(rng, canvas, alpha, digit_boxes, size)


def _paste_away_from_digits(
    rng: np.random.Generator,
    canvas: np.ndarray,
    alpha: np.ndarray,
    digit_boxes: list[tuple[int, int, int, int]],
    size: int,
) -> None:
    if alpha.shape[0] >= size or alpha.shape[1] >= size:
        return
    spot = _find_spot(rng, alpha.shape, size, digit_boxes, 0.0, margin=2)
    if spot is not None:
        x, y = spot
        region = canvas[y : y + alpha.shape[0], x : x + alpha.shape[1]]
        _blend(canvas, alpha, _pick_colour(rng, region), x, y)


def _render_image(
    rng: np.random.Generator, pool: np.ndarray, digits: Any, s: _Settings
) -> tuple[np.ndarray, list[_PlacedDigit]]:
    """One (size, size, 3) uint8 image and its digits, painted last so nothing hides them."""
    canvas = _background(rng, s.size)
    placed = _plan_digits(rng, pool, digits, s)
    _draw_clutter(rng, canvas, [p.xyxy for p in placed], pool, digits, s)
    for p in placed:
        h, w = p.alpha.shape
        colour = _pick_colour(rng, canvas[p.y : p.y + h, p.x : p.x + w])
        _blend(canvas, p.alpha, colour, p.x, p.y)
    return np.round(canvas * 255.0).astype(np.uint8), placed


# --------------------------------------------------------------------------- splits


def _write_split(
    out: Path, split: int, count: int, pool: np.ndarray, digits: Any, s: _Settings, seed: int
) -> tuple[Path, Path]:
    name = _SPLITS[split]
    image_dir = out / name / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        image_id = index + 1
        rng = np.random.default_rng([seed, split, index])
        pixels, placed = _render_image(rng, pool, digits, s)
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(image_dir / file_name, format="PNG")
        images.append({"id": image_id, "file_name": file_name, "width": s.size, "height": s.size})
        annotations += [
            p.annotation(len(annotations) + k + 1, image_id) for k, p in enumerate(placed)
        ]
    info = {
        "description": f"SmallDigits {name} split (sklearn load_digits handwriting)",
        "generator": "hmkd_core.data.synth_digits",
        "version": 1,
        "split": name,
        "seed": seed,
        "settings": {"images": count, **asdict(s)},
        "sample_indices": [int(i) for i in pool],
    }
    categories = [{"id": d + 1, "name": n} for d, n in enumerate(CATEGORY_NAMES)]
    document = {"info": info, "images": images, "annotations": annotations}
    document["categories"] = categories
    ann_path = out / name / "annotations.json"
    ann_path.write_text(json.dumps(document, separators=(",", ":")), encoding="utf-8")
    return image_dir, ann_path


def _check_arguments(train: int, val: int, seed: int, s: _Settings) -> None:
    if train < 0 or val < 0:
        raise ValueError(f"image counts must be >= 0, got train={train}, val={val}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (it seeds NumPy's SeedSequence), got {seed}")
    if s.size < 32:
        raise ValueError(f"size must be at least 32 px, got {s.size}")
    if not 1 <= s.min_digits <= s.max_digits:
        raise ValueError(
            f"need 1 <= min_digits <= max_digits, got {s.min_digits} and {s.max_digits}"
        )
    if not 4 <= s.min_side <= s.max_side <= s.size // 2:
        raise ValueError(
            f"need 4 <= min_side <= max_side <= size/2 ({s.size // 2}), "
            f"got {s.min_side} and {s.max_side}"
        )


def make_small_digits(
    out: Path | str,
    *,
    train: int = 400,
    val: int = 100,
    size: int = 256,
    seed: int = 0,
    min_digits: int = 3,
    max_digits: int = 8,
    min_side: int = 8,
    max_side: int = 28,
) -> dict[str, Path]:
    """Write the SmallDigits train and val splits under ``out`` as PNG + COCO JSON.

    Layout: ``out/{train,val}/images/000001.png`` and ``out/{train,val}/annotations.json``.
    Returns the four paths as ``train_images``, ``train_annotations``, ``val_images`` and
    ``val_annotations``. Existing files of the same names are overwritten.
    """
    settings = _Settings(size, min_digits, max_digits, min_side, max_side)
    _check_arguments(train, val, seed, settings)
    out = Path(out)
    digits = load_digits()
    pools = digit_sample_split(len(digits.target), seed)
    paths: dict[str, Path] = {}
    for split, count in enumerate((train, val)):
        image_dir, ann_path = _write_split(out, split, count, pools[split], digits, settings, seed)
        paths[f"{_SPLITS[split]}_images"] = image_dir
        paths[f"{_SPLITS[split]}_annotations"] = ann_path
    return paths


def synth_digits_stats(annotations: Path | str) -> dict[str, Any]:
    """Counts and box-size figures of one split, to check a generated set is what was asked.

    ``small_fraction`` is the share of boxes with area < 32^2 (COCO "small").
    """
    data = json.loads(Path(annotations).read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in data["categories"]}
    areas = [float(a["bbox"][2] * a["bbox"][3]) for a in data["annotations"]]
    per_category = dict.fromkeys(names.values(), 0)
    for a in data["annotations"]:
        per_category[names[a["category_id"]]] += 1
    n_images, n_boxes = len(data["images"]), len(areas)
    return {
        "images": n_images,
        "boxes": n_boxes,
        "boxes_per_image": n_boxes / n_images if n_images else 0.0,
        "small_fraction": sum(a < SMALL_AREA for a in areas) / n_boxes if n_boxes else 0.0,
        "box_area": {
            "min": min(areas, default=0.0),
            "median": statistics.median(areas) if areas else 0.0,
            "max": max(areas, default=0.0),
        },
        "per_category": per_category,
    }
