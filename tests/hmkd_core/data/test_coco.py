"""CocoDetectionDataset on tiny hand-written COCO files: labels, box cleaning, decoding, errors,
and reproducible augmentation."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from hmkd_core.data import CocoDetectionDataset, DatasetError
from hmkd_core.data.summary import summarize_split
from hmkd_core.evaluation import summarize_coco


def write_dataset(
    root: Path,
    annotations: list[dict[str, Any]],
    *,
    sizes: dict[int, tuple[int, int]] | None = None,
    categories: Sequence[int] = (1,),
) -> tuple[Path, Path]:
    """Write random RGB PNGs (image id -> (width, height)) and a COCO file; return both paths."""
    sizes = sizes or {1: (16, 12)}
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id, (w, h) in sizes.items():
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images_dir / f"{image_id}.png")
    document = {
        "images": [
            {"id": i, "file_name": f"{i}.png", "width": w, "height": h}
            for i, (w, h) in sizes.items()
        ],
        "annotations": [{"iscrowd": 0, "area": 1.0, **a} for a in annotations],
        "categories": [{"id": c, "name": f"c{c}"} for c in categories],
    }
    ann_path = root / "annotations.json"
    ann_path.write_text(json.dumps(document))
    return images_dir, ann_path


def ann(
    ann_id: int, bbox: list[float], *, image_id: int = 1, category_id: int = 1, **kw: Any
) -> dict[str, Any]:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **kw}


# --------------------------------------------------------------------------- labels and boxes


def test_non_contiguous_category_ids_including_zero_get_contiguous_labels(tmp_path: Path) -> None:
    anns = [ann(1, [0, 0, 4, 4], category_id=7), ann(2, [5, 5, 4, 4], category_id=0)]
    ds = CocoDetectionDataset(*write_dataset(tmp_path, anns, categories=[7, 0, 3]))

    assert ds.num_classes == 4
    assert [c["id"] for c in ds.categories] == [0, 3, 7]
    assert ds.label_to_category_id == {1: 0, 2: 3, 3: 7}
    for label, cat_id in ds.label_to_category_id.items():
        assert ds.category_id_to_label[cat_id] == label
    _, target = ds[0]
    assert target["labels"].tolist() == [3, 1]
    assert target["labels"].dtype == torch.int64


def test_crowd_boxes_are_not_targets_but_stay_in_coco(tmp_path: Path) -> None:
    anns = [ann(1, [0, 0, 4, 4]), ann(2, [2, 2, 8, 6], iscrowd=1)]
    ds = CocoDetectionDataset(*write_dataset(tmp_path, anns))

    _, target = ds[0]
    assert target["boxes"].shape == (1, 4)
    assert sorted(ds.coco.getAnnIds(imgIds=[1])) == [1, 2]
    assert ds.coco.anns[2]["iscrowd"] == 1
    assert ds.box_report == {"clipped": 0, "dropped": 0, "crowd": 1}


def test_box_is_converted_to_xyxy_with_canvas_size(tmp_path: Path) -> None:
    ds = CocoDetectionDataset(*write_dataset(tmp_path, [ann(1, [1.5, 2, 4, 3])]))
    _, target = ds[0]

    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert target["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
    assert target["boxes"].canvas_size == (12, 16)
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[1.5, 2.0, 5.5, 5.0]]
    assert target["image_id"] == 1


def test_out_of_image_box_is_clipped_counted_and_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    anns = [ann(1, [10, 8, 10, 10]), ann(2, [-3, -2, 5, 5])]
    with caplog.at_level(logging.WARNING, logger="hmkd_core.data"):
        ds = CocoDetectionDataset(*write_dataset(tmp_path, anns))
        ds[0]
        ds[0]

    _, target = ds[0]
    assert target["boxes"].tolist() == [[10.0, 8.0, 16.0, 12.0], [0.0, 0.0, 2.0, 3.0]]
    assert ds.box_report["clipped"] == 2
    warnings = [r for r in caplog.records if r.name == "hmkd_core.data"]
    assert len(warnings) == 1
    assert "2 box(es) clipped" in warnings[0].getMessage()


def test_degenerate_and_outside_boxes_are_dropped_and_counted(tmp_path: Path) -> None:
    anns = [
        ann(1, [2, 2, 0, 5]),  # zero width
        ann(2, [3, 3, 4, -1]),  # negative height
        ann(3, [20, 20, 5, 5]),  # wholly outside the 16x12 image
        ann(4, [1, 1, 3, 3]),  # fine
    ]
    ds = CocoDetectionDataset(*write_dataset(tmp_path, anns))

    _, target = ds[0]
    assert target["boxes"].tolist() == [[1.0, 1.0, 4.0, 4.0]]
    assert ds.box_report == {"clipped": 0, "dropped": 3, "crowd": 0}
    assert len(ds.coco.anns) == 4  # the ground truth is untouched


def test_image_without_boxes_has_empty_target(tmp_path: Path) -> None:
    ds = CocoDetectionDataset(*write_dataset(tmp_path, [], sizes={1: (8, 6), 2: (5, 5)}))

    assert len(ds) == 2
    _, target = ds[1]
    assert target["boxes"].shape == (0, 4)
    assert target["labels"].shape == (0,)


# --------------------------------------------------------------------------- image decoding


@pytest.mark.parametrize(
    "pixels",
    [
        np.arange(30, dtype=np.uint8).reshape(5, 6) * 8,  # L
        np.full((5, 6, 4), 200, dtype=np.uint8),  # RGBA
    ],
    ids=["grayscale", "rgba"],
)
def test_eight_bit_modes_load_as_rgb_float(tmp_path: Path, pixels: np.ndarray) -> None:
    images_dir, ann_path = write_dataset(tmp_path, [], sizes={1: (6, 5)})
    Image.fromarray(pixels).save(images_dir / "1.png")
    image, _ = CocoDetectionDataset(images_dir, ann_path)[0]

    assert isinstance(image, tv_tensors.Image)
    assert image.shape == (3, 5, 6) and image.dtype == torch.float32
    expected = torch.from_numpy(pixels[..., 0] if pixels.ndim == 3 else pixels).float() / 255
    assert torch.allclose(image[0], expected) and torch.equal(image[0], image[2])


def test_palette_image_loads_as_rgb(tmp_path: Path) -> None:
    images_dir, ann_path = write_dataset(tmp_path, [], sizes={1: (6, 5)})
    Image.new("RGB", (6, 5), (255, 0, 0)).convert("P").save(images_dir / "1.png")
    image, _ = CocoDetectionDataset(images_dir, ann_path)[0]

    assert image.shape == (3, 5, 6)
    assert image[:, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_sixteen_bit_image_is_scaled_not_clipped(tmp_path: Path) -> None:
    images_dir, ann_path = write_dataset(tmp_path, [], sizes={1: (2, 2)})
    pixels = np.array([[0, 32768], [65535, 255]], dtype=np.uint16)
    Image.fromarray(pixels).save(images_dir / "1.png")
    image, _ = CocoDetectionDataset(images_dir, ann_path)[0]

    assert image.shape == (3, 2, 2)
    assert image[:, 1, 0].tolist() == [1.0, 1.0, 1.0]
    assert image[0, 0, 1].item() == pytest.approx(0.5, abs=1e-4)
    assert image[0, 1, 1].item() == pytest.approx(255 / 65535)


@pytest.mark.parametrize(
    ("orientation", "declared_turned", "turned"),
    [
        (6, True, True),  # sides swapped, declared as shown: boxes drawn on the turned photo
        (8, True, True),
        (6, False, False),  # declared as stored: boxes drawn on the stored pixels
        (3, True, False),  # upside down: nothing tells, so the stored pixels
    ],
)
def test_an_exif_orientation_is_applied_where_the_declared_size_is_the_turned_photos(
    tmp_path: Path, orientation: int, declared_turned: bool, turned: bool
) -> None:
    raw = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # stored 3 wide, 2 high
    shown = {3: np.rot90(raw, 2), 6: np.rot90(raw, -1), 8: np.rot90(raw, 1)}[orientation]
    declared = shown if declared_turned else raw
    height, width = declared.shape[:2]
    images_dir, ann_path = write_dataset(tmp_path, [], sizes={1: (width, height)})
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(raw).save(images_dir / "1.png", exif=exif)
    summarize_split(images_dir, ann_path)  # the submit check reads the size the loader will
    image, _ = CocoDetectionDataset(images_dir, ann_path)[0]

    expected = shown if turned else raw
    assert torch.equal(image, torch.from_numpy(expected.transpose(2, 0, 1).copy()).float() / 255)


# --------------------------------------------------------------------------- errors


def test_missing_image_file_names_file_and_id(tmp_path: Path) -> None:
    images_dir, ann_path = write_dataset(tmp_path, [], sizes={1: (4, 4), 2: (4, 4)})
    (images_dir / "2.png").unlink()

    with pytest.raises(DatasetError, match=r"image id 2: file .*2\.png not found"):
        CocoDetectionDataset(images_dir, ann_path)


def test_file_name_leading_out_of_the_image_folder_is_refused(tmp_path: Path) -> None:
    images_dir, ann_path = write_dataset(tmp_path, [], sizes={1: (4, 4)})
    data = json.loads(ann_path.read_text())
    data["images"][0]["file_name"] = "../../etc/passwd"
    ann_path.write_text(json.dumps(data))

    with pytest.raises(DatasetError, match=r"image 1: file_name .* points outside"):
        CocoDetectionDataset(images_dir, ann_path)


def test_malformed_json_names_file_and_position(tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [}')

    with pytest.raises(DatasetError, match=r"broken\.json: not valid JSON at line 1 column 13"):
        CocoDetectionDataset(tmp_path, bad)


def test_missing_top_level_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))

    with pytest.raises(DatasetError, match="'categories'"):
        CocoDetectionDataset(tmp_path, path)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"image_id": 99}, "annotation id 5: image_id 99 is not in 'images'"),
        ({"category_id": 42}, "annotation id 5: category_id 42 is not in 'categories'"),
        ({"bbox": [1, 2, 3]}, "annotation id 5: 'bbox' must be 4 finite numbers"),
    ],
)
def test_bad_annotation_is_named_by_id(tmp_path: Path, bad: dict[str, Any], message: str) -> None:
    images_dir, ann_path = write_dataset(tmp_path, [ann(5, [0, 0, 2, 2]) | bad])

    with pytest.raises(DatasetError, match=message) as info:
        CocoDetectionDataset(images_dir, ann_path)
    assert str(ann_path) in str(info.value)


def test_image_size_disagreeing_with_annotation_is_an_error(tmp_path: Path) -> None:
    images_dir, ann_path = write_dataset(tmp_path, [], sizes={1: (8, 6)})
    Image.new("RGB", (6, 8)).save(images_dir / "1.png")
    ds = CocoDetectionDataset(images_dir, ann_path)

    with pytest.raises(DatasetError, match=r"image id 1: .* is 6x8 but the annotation says 8x6"):
        ds[0]


def test_undecodable_image_names_file_and_id(tmp_path: Path) -> None:
    images_dir, ann_path = write_dataset(tmp_path, [], sizes={1: (4, 4)})
    (images_dir / "1.png").write_bytes(b"not a png")
    ds = CocoDetectionDataset(images_dir, ann_path)

    with pytest.raises(DatasetError, match=r"image id 1: cannot decode .*1\.png"):
        ds[0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"images": [], "categories": [{"id": 1, "name": "caf\u00e9"}]}'.encode("latin-1"),
         r"not UTF-8 \(byte 52: "),
        (b'{"images": [{"id": 1' + b"0" * 5000 + b"}]}", "cannot be parsed as JSON"),
    ],
)  # fmt: skip
def test_annotation_text_that_cannot_be_decoded_names_the_file(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "a.json"
    path.write_bytes(content)

    with pytest.raises(DatasetError, match=message) as info:
        CocoDetectionDataset(tmp_path, path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_annotations_in_every_encoding_json_allows_are_read(tmp_path: Path, encoding: str) -> None:
    images_dir, ann_path = write_dataset(tmp_path, [ann(1, [1, 1, 4, 4])])
    ann_path.write_bytes(ann_path.read_text().encode(encoding))

    assert len(CocoDetectionDataset(images_dir, ann_path)) == 1


@pytest.mark.parametrize("key", ["images", "categories"])
def test_a_file_without_images_or_categories_is_refused(tmp_path: Path, key: str) -> None:
    images_dir, ann_path = write_dataset(tmp_path, [])
    data = json.loads(ann_path.read_text())
    data[key] = []
    ann_path.write_text(json.dumps(data))

    with pytest.raises(DatasetError, match=f"lists no {key}"):
        CocoDetectionDataset(images_dir, ann_path)


def test_a_category_without_a_name_is_named_by_its_id(tmp_path: Path) -> None:
    images_dir, ann_path = write_dataset(tmp_path, [ann(1, [1, 1, 4, 4], category_id=3)])
    data = json.loads(ann_path.read_text())
    data["categories"] = [{"id": 3}]
    ann_path.write_text(json.dumps(data))
    ds = CocoDetectionDataset(images_dir, ann_path)

    assert ds.categories == [{"id": 3, "name": "3"}]
    assert summarize_coco(ds.coco, [])["per_category"] == {"3": 0.0}


def test_two_categories_of_one_name_are_refused(tmp_path: Path) -> None:
    images_dir, ann_path = write_dataset(tmp_path, [], categories=[1, 2])
    data = json.loads(ann_path.read_text())
    data["categories"][1]["name"] = data["categories"][0]["name"]
    ann_path.write_text(json.dumps(data))

    with pytest.raises(DatasetError, match=r"category ids 1 and 2 are both named 'c1'"):
        CocoDetectionDataset(images_dir, ann_path)


@pytest.mark.parametrize(
    ("width", "height"), [(20_000, 20_000), (10**400, 1)], ids=["over-decoder-limit", "400-digits"]
)
def test_a_declared_size_the_decoder_refuses_is_refused_up_front(
    tmp_path: Path, width: int, height: int
) -> None:
    images_dir, ann_path = write_dataset(tmp_path, [])
    data = json.loads(ann_path.read_text())
    data["images"][0].update(width=width, height=height)
    ann_path.write_text(json.dumps(data))

    with pytest.raises(DatasetError, match=r"image id 1: 'width' x 'height' is more pixels than"):
        CocoDetectionDataset(images_dir, ann_path)


def test_an_image_over_the_decoder_limit_names_file_and_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = CocoDetectionDataset(*write_dataset(tmp_path, [], sizes={1: (16, 12)}))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)

    with pytest.raises(DatasetError, match=r"image id 1: cannot decode .*1\.png"):
        ds[0]


@pytest.mark.parametrize("kind", ["symlink-loop", "name-too-long"])
def test_a_file_name_the_filesystem_cannot_resolve_is_refused(tmp_path: Path, kind: str) -> None:
    images_dir, ann_path = write_dataset(tmp_path, [])
    data = json.loads(ann_path.read_text())
    if kind == "symlink-loop":
        data["images"][0]["file_name"] = "loop.png"
        (images_dir / "loop.png").symlink_to("loop.png")
    else:
        data["images"][0]["file_name"] = "a" * 300 + ".png"
    ann_path.write_text(json.dumps(data))

    with pytest.raises(DatasetError, match=r"image id 1: .* cannot be opened in the images"):
        CocoDetectionDataset(images_dir, ann_path)


# --------------------------------------------------------------------------- augmentation


def _flip_dataset(tmp_path: Path, **kw: Any) -> CocoDetectionDataset:
    paths = write_dataset(tmp_path, [ann(1, [1, 2, 4, 3])], sizes={1: (16, 12)})
    return CocoDetectionDataset(*paths, train=True, hflip=True, **kw)


def test_hflip_is_a_function_of_seed_epoch_and_index(tmp_path: Path) -> None:
    ds = _flip_dataset(tmp_path, seed=3)
    torch.manual_seed(1)
    first, _ = ds[0]
    torch.manual_seed(2)
    again, _ = ds[0]
    assert torch.equal(first, again)

    outcomes = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        outcomes.add(ds[0][1]["boxes"][0, 0].item())
    assert outcomes == {1.0, 11.0}  # both flipped and unflipped occur across epochs


def test_getitem_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    ds = _flip_dataset(tmp_path)
    state = torch.get_rng_state()
    ds[0]
    assert torch.equal(torch.get_rng_state(), state)


def test_flip_moves_pixels_and_boxes_together(tmp_path: Path) -> None:
    plain = CocoDetectionDataset(*write_dataset(tmp_path, [ann(1, [1, 2, 4, 3])]))
    ds = _flip_dataset(tmp_path)
    image, target = plain[0]
    for epoch in range(12):
        ds.set_epoch(epoch)
        aug_image, aug_target = ds[0]
        if not torch.equal(aug_image, image):
            break
    else:
        pytest.fail("no epoch in 12 flipped the image")

    assert torch.equal(aug_image, image.flip(-1))
    assert aug_target["boxes"].tolist() == [[16.0 - 5.0, 2.0, 16.0 - 1.0, 5.0]]
    assert aug_target["labels"].tolist() == target["labels"].tolist()


def test_evaluation_never_flips(tmp_path: Path) -> None:
    paths = write_dataset(tmp_path, [ann(1, [1, 2, 4, 3])])
    ds = CocoDetectionDataset(*paths, train=False, hflip=True)
    boxes = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        boxes.add(tuple(ds[0][1]["boxes"][0].tolist()))
    assert boxes == {(1.0, 2.0, 5.0, 5.0)}
