"""COCO evaluation against a hand-made ground truth whose APs can be worked out on paper."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

from hmkd_core.evaluation import CocoEvaluator, EvaluationError, summarize_coco, write_eval_json

# Category ids are non-contiguous on purpose; "bike" has no ground truth at all.
CATEGORIES = [
    {"id": 3, "name": "car"},
    {"id": 7, "name": "person"},
    {"id": 9, "name": "bike"},
]
# (image_id, category_id, [x, y, w, h])
GT_BOXES = [
    (1, 3, [10.0, 10.0, 10.0, 10.0]),  # small, area 100
    (1, 7, [50.0, 50.0, 40.0, 40.0]),  # medium, area 1600
    (2, 3, [5.0, 5.0, 6.0, 6.0]),  # tiny (< 8²), area 36
    (2, 3, [40.0, 40.0, 12.0, 12.0]),  # 8²..16², area 144
    (3, 7, [10.0, 10.0, 20.0, 20.0]),  # small, area 400
]
LABEL_TO_CATEGORY = {1: 3, 2: 7, 3: 9}

# COCO interpolates precision at 101 recall points 0, 0.01, ..., 1. Finding 1 of 2 objects
# with the top score gives precision 1 at recall <= 0.5 (51 points) and 0 beyond.
HALF_FOUND_AP = 51 / 101


@pytest.fixture
def coco_gt(tmp_path: Path) -> COCO:
    dataset = {
        "images": [
            {"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2, 3)
        ],
        "categories": CATEGORIES,
        "annotations": [
            {
                "id": n,
                "image_id": image_id,
                "category_id": cat,
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": 0,
            }
            for n, (image_id, cat, box) in enumerate(GT_BOXES, start=1)
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(dataset))
    return COCO(str(path))


def detection(image_id: int, category_id: int, box: list[float], score: float = 1.0) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}


def test_perfect_detections_score_one(coco_gt: COCO) -> None:
    metrics = summarize_coco(coco_gt, [detection(i, c, b) for i, c, b in GT_BOXES])
    for key in ("AP", "AP50", "AP75", "AP_S", "AP_M", "AR@100"):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics["AP_L"] is None  # no large ground truth: None, never pycocotools' -1
    assert metrics["per_category"] == {"car": 1.0, "person": 1.0, "bike": None}


def test_no_detections_score_zero(coco_gt: COCO) -> None:
    metrics = summarize_coco(coco_gt, [])
    for key in ("AP", "AP50", "AP75", "AP_S", "AP_M", "AR@100"):
        assert metrics[key] == 0.0, key
    assert metrics["AP_L"] is None
    assert metrics["per_category"] == {"car": 0.0, "person": 0.0, "bike": None}


def test_one_of_two_found_matches_hand_computed_ap(coco_gt: COCO) -> None:
    found = detection(2, 3, [5.0, 5.0, 6.0, 6.0])
    metrics = summarize_coco(coco_gt, [found], image_ids=[2])
    # Exact at every IoU threshold, so all ten thresholds give the same 51/101.
    for key in ("AP", "AP50", "AP75", "AP_S"):
        assert metrics[key] == pytest.approx(HALF_FOUND_AP, abs=1e-9), key
    assert metrics["AR@100"] == pytest.approx(0.5)
    assert metrics["per_category"]["car"] == pytest.approx(HALF_FOUND_AP, abs=1e-9)
    assert metrics["per_category"]["person"] is None  # no person in image 2


def test_iou_062_counts_at_50_not_at_75(coco_gt: COCO) -> None:
    # Gt person 20x20 at (10, 10); a box 12.4 high inside it has IoU 12.4 / 20 = 0.62.
    metrics = summarize_coco(coco_gt, [detection(3, 7, [10.0, 10.0, 20.0, 12.4])], image_ids=[3])
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == 0.0
    # Thresholds 0.50, 0.55, 0.60 match; 0.65..0.95 do not: 3 of 10.
    assert metrics["AP"] == pytest.approx(0.3)


def test_a_box_of_annotation_id_zero_is_found_like_any_other(tmp_path: Path) -> None:
    """COCOeval records a match by the ground truth's annotation id and reads 0 as no match:
    id 0 (a converter counting from 0) made a perfect detection of it a false positive."""
    path = tmp_path / "from_zero.json"
    images = [{"id": 1, "file_name": "1.png", "width": 100, "height": 100}]
    boxes = [[10.0, 10.0, 10.0, 10.0], [50.0, 50.0, 20.0, 20.0]]
    annotations = [
        {"id": n, "image_id": 1, "category_id": 3, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for n, b in enumerate(boxes)
    ]
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES})
    )
    gt = COCO(str(path))

    metrics = summarize_coco(gt, [detection(1, 3, b) for b in boxes])
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR@100"] == pytest.approx(1.0)
    assert 0 in gt.anns and gt.anns[0]["bbox"] == boxes[0]  # the ground truth is left as given


def test_extra_area_ranges(coco_gt: COCO) -> None:
    ranges = {"tiny": (0.0, 64.0), "xsmall": (64.0, 256.0), "huge": (5000.0, 1e6)}
    found = detection(2, 3, [5.0, 5.0, 6.0, 6.0])  # the tiny car; the 12x12 one is missed
    metrics = summarize_coco(coco_gt, [found], extra_area_ranges=ranges, image_ids=[2])
    assert metrics["AP_tiny"] == pytest.approx(1.0)
    assert metrics["AP_xsmall"] == 0.0
    assert metrics["AP_huge"] is None
    # The standard numbers are unchanged by the extra ranges.
    assert metrics["AP"] == pytest.approx(HALF_FOUND_AP, abs=1e-9)


def test_extra_area_range_must_not_shadow_a_standard_one(coco_gt: COCO) -> None:
    with pytest.raises(EvaluationError, match="clashes"):
        summarize_coco(coco_gt, [], extra_area_ranges={"small": (0.0, 10.0)})


def test_unmapped_category_id_is_refused(coco_gt: COCO) -> None:
    with pytest.raises(EvaluationError, match="map the model's contiguous labels"):
        summarize_coco(coco_gt, [detection(1, 1, [10.0, 10.0, 10.0, 10.0])])


def test_evaluator_maps_labels_and_boxes_back(coco_gt: COCO) -> None:
    evaluator = CocoEvaluator(coco_gt, LABEL_TO_CATEGORY)
    outputs = [
        {
            "boxes": torch.tensor([[10.0, 10.0, 20.0, 20.0], [50.0, 50.0, 90.0, 90.0]]),
            "labels": torch.tensor([1, 2]),
            "scores": torch.tensor([0.9, 0.8]),
        },
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "scores": torch.zeros(0),
        },
    ]
    evaluator.process(outputs, [1, {"image_id": torch.tensor(2)}])

    results = evaluator.results()
    assert [r["category_id"] for r in results] == [3, 7]
    assert results[0]["bbox"] == [10.0, 10.0, 10.0, 10.0]
    assert results[0]["score"] == pytest.approx(0.9)
    assert evaluator.image_ids() == [1, 2]

    metrics = evaluator.evaluate()
    # Image 3 was never processed, so its person is not counted as missed. Image 2 was
    # processed with nothing found: 1 of 3 cars found, precision 1 up to recall 0.33 (34 points).
    assert metrics["per_category"]["person"] == pytest.approx(1.0)
    assert metrics["per_category"]["car"] == pytest.approx(34 / 101, abs=1e-9)

    evaluator.reset()
    assert evaluator.results() == []
    with pytest.raises(EvaluationError, match="process"):
        evaluator.evaluate()


def test_evaluator_merges_other_ranks_and_drops_duplicates(coco_gt: COCO) -> None:
    evaluator = CocoEvaluator(coco_gt, LABEL_TO_CATEGORY)
    outputs = [
        {
            "boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]),
            "labels": torch.tensor([2]),
            "scores": torch.tensor([1.0]),
        }
    ]
    evaluator.process(outputs, [3])
    other_rank = evaluator.results()  # the same image, padded onto a second rank
    metrics = evaluator.evaluate(other_rank, extra_image_ids=[3])
    assert metrics["AP"] == pytest.approx(1.0)  # a duplicate would be a false positive


def test_evaluator_refuses_unknown_label(coco_gt: COCO) -> None:
    evaluator = CocoEvaluator(coco_gt, LABEL_TO_CATEGORY)
    output = {
        "boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]),
        "labels": torch.tensor([4]),
        "scores": torch.tensor([0.5]),
    }
    with pytest.raises(EvaluationError, match="num_classes"):
        evaluator.process([output], [1])


def test_write_eval_json_round_trip(tmp_path: Path, coco_gt: COCO) -> None:
    metrics = summarize_coco(coco_gt, [detection(i, c, b) for i, c, b in GT_BOXES])
    path = tmp_path / "eval.json"
    write_eval_json(metrics, path)

    text = path.read_text()
    assert json.loads(text) == metrics
    top_keys = list(json.loads(text))
    assert top_keys == sorted(top_keys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "instances.json"]


def test_write_eval_json_needs_top_level_ap(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="AP_S"):
        write_eval_json({"bbox": {"AP": 0.5, "AP_S": 0.1}}, tmp_path / "eval.json")
    assert not any(tmp_path.iterdir())


def test_pycocotools_prints_go_to_debug_log(
    coco_gt: COCO, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    capsys.readouterr()  # drop what loading the fixture printed
    with caplog.at_level("DEBUG", logger="hmkd_core.evaluation.coco_eval"):
        summarize_coco(
            coco_gt,
            [detection(1, 3, [10.0, 10.0, 10.0, 10.0])],
            extra_area_ranges={"tiny": (0.0, 64.0)},
        )
    assert capsys.readouterr().out == ""
    assert "Average Precision" in caplog.text
