"""Detectors come from torchvision parts with the pyramid, anchors and sizes the spec asks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models.detection import FasterRCNN, RetinaNet

from hmkd_core.distill.hooks import FeatureRecorder
from hmkd_core.models import (
    StudentHeader,
    WeightsError,
    build_detector,
    export_student,
    load_student,
)
from hmkd_core.spec import ModelSpec

TINY = dict(fpn_channels=16, min_size=64, max_size=64, anchor_sizes=[8, 16, 32, 64, 128])


def _batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


@pytest.mark.parametrize(
    ("arch", "cls", "levels"),
    [
        ("faster_rcnn", FasterRCNN, ["p2", "p3", "p4", "p5", "p6"]),
        ("retinanet", RetinaNet, ["p3", "p4", "p5", "p6", "p7"]),
    ],
)
def test_pyramid_levels_and_width(arch: str, cls: type, levels: list[str]) -> None:
    model = build_detector(ModelSpec(arch=arch, **TINY), num_classes=4)
    assert isinstance(model, cls)
    assert model.backbone.out_channels == 16
    with FeatureRecorder(model) as rec:
        model.train()
        losses = model(*_batch())
        feats = rec.levels()
    assert list(feats) == levels
    assert all(f.shape[1] == 16 for f in feats.values())
    assert all(torch.isfinite(v) for v in losses.values())
    assert rec._handles == []  # hooks removed on exit


def test_small_anchors_and_input_size() -> None:
    model = build_detector(ModelSpec(**TINY), num_classes=3)
    assert model.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    assert model.transform.min_size == (64,)
    assert model.transform.max_size == 64


def test_frozen_stages_follow_trainable_layers() -> None:
    model = build_detector(ModelSpec(**TINY, trainable_backbone_layers=2), num_classes=3)
    body = model.backbone.body
    assert not any(p.requires_grad for p in body.layer2.parameters())
    assert all(p.requires_grad for p in body.layer4.parameters())


def test_export_loads_back_into_plain_torchvision(tmp_path: Path) -> None:
    spec = ModelSpec(**TINY)
    model = build_detector(spec, num_classes=3).eval()
    header = StudentHeader(
        spec, 3, [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}], {1: 5, 2: 9}, {"AP": 0.5}
    )
    path = export_student(model, header, tmp_path / "student.pt")
    loaded, head = load_student(path)
    assert isinstance(loaded, FasterRCNN)
    assert head.label_to_category_id == {1: 5, 2: 9}
    assert head.metrics == {"AP": 0.5}
    x = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        a, b = model(x)[0], loaded(x)[0]
    assert torch.equal(a["boxes"], b["boxes"])
    # the same file also serves as `weights:` of a new detector (a teacher, say)
    again = build_detector(spec.model_copy(update={"weights": str(path)}), num_classes=3)
    assert all(
        torch.equal(p, q)
        for p, q in zip(again.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        build_detector(ModelSpec(**TINY, weights=str(tmp_path / "nope.pt")), num_classes=3)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable"):
        build_detector(ModelSpec(**TINY, weights=str(bad)), num_classes=3)
    # the spec refuses it; a spec changed without validation still gets a clear error
    with pytest.raises(ValueError, match="resnet50"):
        ModelSpec(**TINY, weights="coco")
    with pytest.raises(WeightsError, match="resnet50"):
        build_detector(ModelSpec(**TINY).model_copy(update={"weights": "coco"}), num_classes=3)
    other = tmp_path / "other.pt"
    export_student(
        build_detector(ModelSpec(**TINY), 3), StudentHeader(ModelSpec(**TINY), 3, [], {}), other
    )
    with pytest.raises(WeightsError, match="does not match"):
        build_detector(ModelSpec(**{**TINY, "fpn_channels": 32}, weights=str(other)), num_classes=3)


def test_downloading_weights_fail_clearly_without_network() -> None:
    # This machine has no route to the weights' host; the error must say what to do.
    try:
        build_detector(ModelSpec(**TINY, weights="imagenet"), num_classes=3)
    except WeightsError as err:
        assert "pass their path" in str(err)
    # With a network (or a warm cache) the download succeeds: nothing to assert then.
