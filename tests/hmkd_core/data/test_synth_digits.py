"""SmallDigits: reproducible bytes, unseen validation handwriting, small and tight boxes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from hmkd_core.data import CocoDetectionDataset, make_small_digits, synth_digits_stats
from hmkd_core.data.synth_digits import INK_THRESHOLD, render_digit


@pytest.fixture(scope="module")
def digits_set(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("small_digits")
    return make_small_digits(out, train=12, val=6, size=128, seed=5)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_layout_and_coco_fields(digits_set: dict[str, Path]) -> None:
    assert sorted(digits_set) == [
        "train_annotations",
        "train_images",
        "val_annotations",
        "val_images",
    ]
    data = _load(digits_set["train_annotations"])
    assert digits_set["train_images"] == digits_set["train_annotations"].parent / "images"
    assert [c["id"] for c in data["categories"]] == list(range(1, 11))
    assert data["categories"][0]["name"] == "digit_0"
    assert len(data["images"]) == 12
    assert all((digits_set["train_images"] / im["file_name"]).is_file() for im in data["images"])
    assert data["info"]["seed"] == 5 and data["info"]["settings"]["size"] == 128
    counts = np.bincount([a["image_id"] for a in data["annotations"]], minlength=13)[1:]
    assert counts.min() >= 3 and counts.max() <= 8
    assert all(
        a["iscrowd"] == 0 and a["area"] == a["bbox"][2] * a["bbox"][3] for a in data["annotations"]
    )


def test_same_arguments_give_identical_bytes(tmp_path: Path) -> None:
    first = make_small_digits(tmp_path / "a", train=2, val=1, size=64, seed=9)
    second = make_small_digits(tmp_path / "b", train=2, val=1, size=64, seed=9)
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )

    assert len(files) == 5  # 3 PNGs and 2 JSON files
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    other = make_small_digits(tmp_path / "c", train=2, val=1, size=64, seed=10)
    assert other["train_annotations"].read_bytes() != first["train_annotations"].read_bytes()
    assert second["val_images"].is_dir()


def test_train_and_val_handwriting_are_disjoint(digits_set: dict[str, Path]) -> None:
    train, val = _load(digits_set["train_annotations"]), _load(digits_set["val_annotations"])
    train_pool, val_pool = set(train["info"]["sample_indices"]), set(val["info"]["sample_indices"])
    used_train = {a["source"]["sample"] for a in train["annotations"]}
    used_val = {a["source"]["sample"] for a in val["annotations"]}

    assert not train_pool & val_pool
    assert len(train_pool | val_pool) == len(load_digits().target)
    assert used_train <= train_pool and used_val <= val_pool
    assert used_train and used_val and not used_train & used_val


def test_most_boxes_are_coco_small(digits_set: dict[str, Path]) -> None:
    stats = synth_digits_stats(digits_set["train_annotations"])

    assert stats["images"] == 12 and stats["boxes"] >= 36
    assert stats["small_fraction"] > 0.7
    assert sum(stats["per_category"].values()) == stats["boxes"]
    assert 0 < stats["box_area"]["min"] <= stats["box_area"]["median"] <= stats["box_area"]["max"]


@pytest.mark.parametrize("side", [8, 13, 28])
@pytest.mark.parametrize("angle", [0.0, -7.5, 6.0])
def test_rendered_digit_has_ink_on_every_border_line(side: int, angle: float) -> None:
    digits = load_digits()
    for sample in digits.images[:20]:
        alpha = render_digit(sample, side=side, angle=angle)
        for line in (alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]):
            assert line.max() >= INK_THRESHOLD
        assert alpha.max() == 1.0
        assert ((alpha == 0) | (alpha >= INK_THRESHOLD)).all()


def test_boxes_are_tight_around_the_ink_in_the_image(digits_set: dict[str, Path]) -> None:
    """Re-render an isolated digit from its recorded source: the sprite fills the box exactly
    (ink on each border line, checked above), and in the image every full-ink pixel of the
    sprite has one colour, so the sprite sits where the box says."""
    data = _load(digits_set["train_annotations"])
    digits = load_digits()
    ann = next(a for a in data["annotations"] if _isolated(a, data["annotations"]))
    x, y, w, h = (int(v) for v in ann["bbox"])
    src = ann["source"]
    alpha = render_digit(digits.images[src["sample"]], side=src["side"], angle=src["angle"])
    image = np.asarray(Image.open(digits_set["train_images"] / f"{ann['image_id']:06d}.png"))
    crop = image[y : y + h, x : x + w].astype(int)

    assert alpha.shape == (h, w)
    assert ann["category_id"] == digits.target[src["sample"]] + 1
    core = crop[alpha == 1.0]
    assert len(core) > 3
    assert (core.max(axis=0) - core.min(axis=0)).max() <= 1


def _isolated(ann: dict[str, Any], annotations: list[dict[str, Any]]) -> bool:
    x, y, w, h = ann["bbox"]
    for other in annotations:
        if other["image_id"] != ann["image_id"] or other["id"] == ann["id"]:
            continue
        ox, oy, ow, oh = other["bbox"]
        if x < ox + ow and ox < x + w and y < oy + oh and oy < y + h:
            return False
    return True


def test_loads_as_a_detection_dataset(digits_set: dict[str, Path]) -> None:
    ds = CocoDetectionDataset(digits_set["val_images"], digits_set["val_annotations"])
    data = _load(digits_set["val_annotations"])
    image, target = ds[0]
    first = [a for a in data["annotations"] if a["image_id"] == ds.image_ids[0]]

    assert len(ds) == 6 and ds.num_classes == 11
    assert image.shape == (3, 128, 128)
    assert ds.box_report == {"clipped": 0, "dropped": 0, "crowd": 0}
    expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in first)]
    assert target["boxes"].tolist() == expected
    assert target["labels"].tolist() == [a["category_id"] for a in first]  # id k -> label k


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_digits": 5, "max_digits": 2}, "min_digits <= max_digits"),
        ({"size": 40, "max_side": 28}, "max_side <= size/2"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_small_digits(tmp_path, train=1, val=1, **kwargs)
