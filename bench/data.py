"""A preset's data: the training, validation and tuning splits as COCO files on disk.

SmallDigits is generated (deterministically, so it is written once per settings); a COCO data
set such as HIT-UAV is read where it lies and only its annotation files are rewritten, to hold
the tuning images out of training. Either way the tuning split is never the reported one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.presets import Preset, Splits
from hmkd_core.data import make_small_digits


def _write_once(root: Path, settings: dict[str, Any], make: Any) -> None:
    """Run `make()` unless `root` already holds output of these very settings."""
    marker = root / "settings.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == settings):
        root.mkdir(parents=True, exist_ok=True)
        make()
        marker.write_text(json.dumps(settings))


def _digits(preset: Preset, root: Path) -> Splits:
    args = {k: v for k, v in preset.data.items() if k not in ("kind", "tune")}
    main, tune = root / "digits", root / "tune"
    _write_once(main, args, lambda: make_small_digits(main, **args))
    # Validation images drawn with another data seed: unseen handwriting and layouts.
    tune_args = {**args, "train": 0, "val": preset.data["tune"], "seed": args["seed"] + 1}
    _write_once(tune, tune_args, lambda: make_small_digits(tune, **tune_args))
    return Splits(
        train=(main / "train" / "images", main / "train" / "annotations.json"),
        val=(main / "val" / "images", main / "val" / "annotations.json"),
        tune=(tune / "val" / "images", tune / "val" / "annotations.json"),
    )


def hold_out(annotations: dict[str, Any], count: int) -> tuple[dict, dict]:
    """Split a COCO dict into (kept, held out): `count` images spread evenly over the ids.

    Even spacing over the id order (frames of the same flight are consecutive) keeps every
    flight in training and takes a few frames of each for tuning.
    """
    images = sorted(annotations["images"], key=lambda im: im["id"])
    if not 0 < count < len(images):
        raise ValueError(f"tuning split of {count} images from {len(images)}: out of range")
    step = len(images) / count
    held = {images[int(i * step)]["id"] for i in range(count)}

    def subset(keep: bool) -> dict[str, Any]:
        return {
            **annotations,
            "images": [im for im in images if (im["id"] in held) != keep],
            "annotations": [
                a for a in annotations["annotations"] if (a["image_id"] in held) != keep
            ],
        }

    return subset(True), subset(False)


def _coco(preset: Preset, root: Path) -> Splits:
    source = Path(preset.data["root"]).resolve()
    train_ann = source / "train" / "annotations.json"
    if not train_ann.is_file():
        raise SystemExit(
            f"{preset.name}: {train_ann} not found; the preset reads {preset.data['title']} "
            f"from {preset.data['root']} (relative to the project folder)"
        )
    settings = {"source": str(source), "tune": preset.data["tune"]}

    def make() -> None:
        kept, held = hold_out(json.loads(train_ann.read_text()), preset.data["tune"])
        (root / "train.json").write_text(json.dumps(kept))
        (root / "tune.json").write_text(json.dumps(held))

    _write_once(root, settings, make)
    images = source / "train" / "images"
    return Splits(
        train=(images, root / "train.json"),
        val=(source / "val" / "images", source / "val" / "annotations.json"),
        tune=(images, root / "tune.json"),
    )


def prepare(preset: Preset, root: Path) -> Splits:
    """The preset's splits under `root` (written there if needed)."""
    return _digits(preset, root) if preset.data["kind"] == "digits" else _coco(preset, root)
