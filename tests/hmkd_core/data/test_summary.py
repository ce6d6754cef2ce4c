"""Split summaries: the loader's checks without pixels, and box sizes at two scales."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hmkd_core.data import DatasetError
from hmkd_core.data.summary import input_area_ranges, resize_scale, size_bin, summarize_split
from tests.conftest import png_bytes


def _split(
    tmp_path: Path, boxes: list[list[float]], *, width: int = 640, height: int = 512
) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes(width, height))
    anns = [
        {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": box} for i, box in enumerate(boxes)
    ]
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": width, "height": height}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "empty"}],
    }
    path = tmp_path / "a.json"
    path.write_text(json.dumps(coco))
    return images, path


def test_size_bins_are_cocos_with_two_finer_small_ranges() -> None:
    assert [size_bin(side * side) for side in (7.9, 8, 15.9, 16, 31.9, 32, 95.9, 96)] == [
        "tiny", "xsmall", "xsmall", "small", "small", "medium", "medium", "large",
    ]  # fmt: skip
    assert resize_scale(640, 512, 256, 320) == pytest.approx(0.5)  # capped by the long side
    assert resize_scale(640, 512, 800, 1333) == pytest.approx(800 / 512)


def test_a_summary_counts_boxes_at_native_and_input_size(tmp_path: Path) -> None:
    images, annotations = _split(tmp_path, [[0, 0, 20, 20], [0, 0, 40, 40], [0, 0, 10, 10]])
    summary = summarize_split(images, annotations, input_size=(256, 320))
    assert (summary.images, summary.boxes, summary.images_without_boxes) == (1, 3, 0)
    assert summary.native_sizes == {"tiny": 0, "xsmall": 1, "small": 1, "medium": 1, "large": 0}
    # at half size every side halves: 10 -> 5 (tiny), 20 -> 10 (xsmall), 40 -> 20 (small)
    assert summary.input_sizes == {"tiny": 1, "xsmall": 1, "small": 1, "medium": 0, "large": 0}
    assert [c.boxes for c in summary.categories] == [3, 0]
    (warning,) = summary.warnings("train")
    assert "category 2 'empty' has no boxes" in warning


def test_a_summary_refuses_what_the_loader_refuses(tmp_path: Path) -> None:
    images, annotations = _split(tmp_path, [[0, 0, 20, 20]])
    (images / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"a\.png not found"):
        summarize_split(images, annotations)


def test_input_ranges_scale_cocos_small_by_the_resize_factor() -> None:
    ranges = input_area_ranges([(640, 512)] * 3, 256, 320)  # halved
    assert ranges["S_input"] == (0.0, 64.0**2)  # small at input: under 32 px, 64 native
    assert ranges["xsmall_input"] == (16.0**2, 32.0**2)
    assert input_area_ranges([(640, 512), (320, 256)], 256, 320) == {}  # two factors


def test_boxes_the_loader_drops_are_not_counted_as_boxes_but_warned_about(tmp_path: Path) -> None:
    kept, clipped = [0, 0, 20, 20], [630, 0, 20, 20]
    zero_width, outside = [5, 5, 0, 10], [700, 0, 5, 5]  # the image is 640 wide
    images, annotations = _split(tmp_path, [kept, clipped, zero_width, outside])
    summary = summarize_split(images, annotations, input_size=(256, 320))
    assert (summary.boxes, summary.dropped, summary.images_without_boxes) == (2, 2, 0)
    assert [c.boxes for c in summary.categories] == [2, 0]
    assert sum(summary.native_sizes.values()) == sum(summary.input_sizes.values()) == 2
    dropped = [w for w in summary.warnings("train") if "dropped" in w]
    assert dropped == [
        "data.train: 2 box(es) dropped: under 1 px a side once clipped to their image (a zero "
        "or negative width or height, or a box outside the image); the detector never sees them"
    ]


def test_a_split_whose_every_box_is_dropped_has_no_boxes(tmp_path: Path) -> None:
    images, annotations = _split(tmp_path, [[0, 0, 0, 0], [0, 600, 10, 10]])
    summary = summarize_split(images, annotations)
    assert (summary.boxes, summary.dropped, summary.images_without_boxes) == (0, 2, 1)
    train, val = summary.warnings("train"), summary.warnings("val")
    assert "data.train: no boxes at all; the detector learns only background" in train
    assert any(w.startswith("data.val: no boxes at all; every AP is undefined") for w in val)
    assert any("data.val: 2 box(es) dropped" in w and "evaluation" in w for w in val)


def test_a_summary_opens_every_images_header_and_checks_its_size(tmp_path: Path) -> None:
    """What failed the job in the worker, after it queued, fails the check at submit."""
    images, annotations = _split(tmp_path, [[0, 0, 20, 20]], width=64, height=48)
    summarize_split(images, annotations)
    (images / "a.png").write_bytes(png_bytes(48, 64))  # the sides swapped, no EXIF turn
    with pytest.raises(DatasetError, match=r"a\.png is 48x64 but the annotation says 64x48"):
        summarize_split(images, annotations)
    (images / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    with pytest.raises(DatasetError, match=r"file .*a\.png in the images folder cannot be decoded"):
        summarize_split(images, annotations)


def test_a_summary_counts_the_other_unreadable_images(tmp_path: Path) -> None:
    images, annotations = _split(tmp_path, [[0, 0, 20, 20]], width=64, height=48)
    coco = json.loads(annotations.read_text())
    for i in (2, 3):
        coco["images"].append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 48})
        (images / f"{i}.png").write_text("not an image")
    annotations.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match=r"image id 2: .* \(1 more image\(s\) with a problem\)"):
        summarize_split(images, annotations)
