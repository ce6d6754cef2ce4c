"""One student forward serves detection and distillation; the teacher stays frozen."""

from __future__ import annotations

import copy

import pytest
import torch

from hmkd_core.distill import ResponseDistiller, build_distiller
from hmkd_core.distill.hooks import FeatureRecorder
from hmkd_core.engine.module import FrozenTeacher, IncompatiblePairError, TrainModule, check_pair
from hmkd_core.models import build_detector
from hmkd_core.spec import DistillSpec, ModelSpec

S = ModelSpec(fpn_channels=16, min_size=64, max_size=64, anchor_sizes=[8, 16, 32, 64, 128])
T = S.model_copy(update={"backbone": "resnet34", "fpn_channels": 32})


def _batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    return [torch.rand(3, 64, 64), torch.rand(3, 64, 64)], [
        {
            "boxes": torch.tensor([[4.0, 4.0, 14.0, 16.0], [30.0, 30.0, 60.0, 50.0]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.tensor([[10.0, 40.0, 18.0, 50.0]]), "labels": torch.tensor([2])},
    ]


@pytest.mark.parametrize("method", ["mimic", "fgd", "mgd", "hmkd"])
def test_losses_are_prefixed_and_teacher_gets_no_gradient(method: str) -> None:
    student = build_detector(S, 3)
    teacher = FrozenTeacher(build_detector(T, 3))
    distiller = build_distiller(
        DistillSpec(method=method),
        levels=("p2", "p3", "p4"),
        student_channels=16,
        teacher_channels=32,
    )
    module = TrainModule(student, distiller, teacher)
    module.train()  # must not put the teacher in training mode
    assert not teacher.detector.training
    before = {k: v.clone() for k, v in teacher.detector.state_dict().items()}
    losses = module(*_batch())
    assert any(k.startswith("student.loss_") for k in losses)
    distill = [k for k in losses if k.startswith("distill.")]
    assert distill and all(torch.isfinite(losses[k]) for k in distill)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.detector.parameters())
    assert student.backbone.fpn.layer_blocks[0][0].weight.grad is not None
    assert any(p.grad is not None for p in distiller.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.detector.state_dict().items())
    assert "teacher" not in dict(module.named_children())
    assert not any(k.startswith("teacher") for k in module.state_dict())


def test_pairs_that_cannot_share_a_batch_are_refused() -> None:
    check_pair(S, T, ("p2", "p3", "p4"))
    with pytest.raises(IncompatiblePairError, match="image_mean"):
        check_pair(S, T.model_copy(update={"image_mean": (0.5, 0.5, 0.5)}), ("p2",))
    with pytest.raises(IncompatiblePairError, match="p2"):
        check_pair(S, T.model_copy(update={"arch": "retinanet"}), ("p2", "p3", "p4"))


@pytest.mark.parametrize("method", ["mimic", "hmkd"])
def test_while_aligning_the_distillation_loss_trains_only_the_distiller(method: str) -> None:
    # `distill.align_iters`: the distiller fits the student's features before it moves them
    torch.manual_seed(0)
    student = build_detector(S, 3)
    distiller = build_distiller(
        DistillSpec(method=method),
        levels=("p2", "p3", "p4"),
        student_channels=16,
        teacher_channels=32,
    )
    module = TrainModule(student, distiller, FrozenTeacher(build_detector(T, 3)))
    images, targets = _batch()
    grads = {}
    for detach in (False, True):
        module.zero_grad(set_to_none=True)
        module.detach_student = detach
        losses = module(images, targets)
        distill = sum(v for k, v in losses.items() if k.startswith("distill."))
        distill.backward()
        grads[detach] = student.backbone.fpn.layer_blocks[0][0].weight.grad
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.parameters())
    assert grads[False] is not None and grads[False].abs().sum() > 0
    assert grads[True] is None  # nothing of the distillation loss reached the student


ALL_TERMS = ResponseDistiller(1.0, 2.0, box_weight=1.0, objectness_weight=1.0)
TERMS = ("distill.loss_response", "distill.loss_response_box", "distill.loss_response_objectness")


def _response_module(
    teacher_spec: ModelSpec, distiller: ResponseDistiller | None = None
) -> tuple[TrainModule, FrozenTeacher]:
    torch.manual_seed(0)
    student = build_detector(S, 3)
    teacher = FrozenTeacher(build_detector(teacher_spec, 3))
    distiller = distiller or ResponseDistiller(1.0, 2.0)
    return TrainModule(student, None, teacher, distiller), teacher


def test_the_teacher_answers_the_rois_and_anchors_the_student_trained_on() -> None:
    # a teacher that is the student's copy, on the same RoIs and anchors and its own (identical)
    # features, gives the same scores, deltas and objectness: every term is 0 only if both
    # heads saw the very same RoIs and anchors
    module, teacher = _response_module(S, ALL_TERMS)
    teacher.detector.load_state_dict(module.student.state_dict())
    losses = module(*_batch())
    assert sorted(k for k in losses if k.startswith("distill.")) == sorted(TERMS)
    for name in TERMS:
        assert losses[name].abs() < 1e-5, name


def test_each_response_term_trains_its_own_head_of_the_student() -> None:
    module, _ = _response_module(S.model_copy(update={"fpn_channels": 32}), ALL_TERMS)
    module.train()
    losses = module(*_batch())
    student = module.student
    reached = {  # the head each term's gradient must reach
        "distill.loss_response": student.roi_heads.box_predictor.cls_score.weight,
        "distill.loss_response_box": student.roi_heads.box_predictor.bbox_pred.weight,
        "distill.loss_response_objectness": student.rpn.head.cls_logits.weight,
    }
    for name, weight in reached.items():
        assert losses[name] > 0, name
        (grad,) = torch.autograd.grad(losses[name], weight, retain_graph=True)
        assert grad.abs().sum() > 0, name
    # the class-score and box terms never reach the RPN; objectness never the box head
    for name in TERMS[:2]:
        (grad,) = torch.autograd.grad(
            losses[name], student.rpn.head.cls_logits.weight, retain_graph=True, allow_unused=True
        )
        assert grad is None or grad.abs().sum() == 0, name


def test_class_score_distillation_trains_the_student_and_leaves_the_teacher() -> None:
    module, teacher = _response_module(S.model_copy(update={"fpn_channels": 32}))
    before = {k: v.clone() for k, v in teacher.detector.state_dict().items()}
    module.train()
    losses = module(*_batch())
    assert losses["distill.loss_response"] > 0
    losses["distill.loss_response"].backward()
    assert module.student.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    module.zero_grad(set_to_none=True)
    module.detach_student = True  # `distill.align_iters`: the distillation moves no student weight
    losses = module(*_batch())
    assert not losses["distill.loss_response"].requires_grad
    assert not teacher.detector.training
    assert all(torch.equal(before[k], v) for k, v in teacher.detector.state_dict().items())


def test_class_score_distillation_beside_a_feature_method() -> None:
    torch.manual_seed(0)
    distiller = build_distiller(
        DistillSpec(method="mimic"), levels=("p2", "p3"), student_channels=16, teacher_channels=32
    )
    module = TrainModule(
        build_detector(S, 3), distiller, FrozenTeacher(build_detector(T, 3)), ResponseDistiller(1.0)
    )
    losses = module(*_batch())
    assert {"distill.loss_response", "distill.loss_mimic_p2"} <= set(losses)


def test_class_score_distillation_needs_a_teacher_and_a_box_head() -> None:
    with pytest.raises(ValueError, match="needs a teacher"):
        TrainModule(build_detector(S, 3), None, None, ResponseDistiller(1.0))
    retina = S.model_copy(update={"arch": "retinanet"})
    with pytest.raises(TypeError, match="box head"):
        TrainModule(
            build_detector(retina, 3),
            None,
            FrozenTeacher(build_detector(retina, 3)),
            ResponseDistiller(1.0),
        )


# A teacher reading the images at twice the student's input size (the student's 64..96)
S2 = S.model_copy(update={"max_size": 96})
T2 = T.model_copy(update={"min_size": 128, "max_size": 192})


def test_a_teacher_at_a_whole_multiple_of_the_students_input_is_accepted() -> None:
    assert check_pair(S, T, ("p2",)) == 1
    assert check_pair(S2, T2, ("p2",)) == 2
    assert check_pair(S2, T2.model_copy(update={"min_size": 256, "max_size": 384}), ()) == 4
    for lo, hi in ((96, 144), (192, 288), (320, 480), (32, 48)):  # 1.5x, 3x, 5x, 0.5x
        with pytest.raises(IncompatiblePairError, match=r"^teacher\.min_size: .*times 1, 2, 4"):
            check_pair(S2, T2.model_copy(update={"min_size": lo, "max_size": hi}), ())
    # min_size twice the student's names max_size, the one at fault, and what it must be
    with pytest.raises(IncompatiblePairError, match=r"^teacher\.max_size: 128, .* 192"):
        check_pair(S2, T2.model_copy(update={"max_size": 128}), ())


def _odd_images() -> list[torch.Tensor]:
    # sizes whose resize rounds differently at 1x and 2x, and a batch padded on both sides
    return [torch.rand(3, 50, 71), torch.rand(3, 37, 81), torch.rand(3, 64, 45)]


def test_a_teacher_at_twice_the_input_sees_its_own_resize_on_twice_the_students_grid() -> None:
    torch.manual_seed(0)
    student = build_detector(S2, 3).eval()
    teacher = FrozenTeacher(build_detector(T2, 3), scale=2)
    images = _odd_images()
    mine, _ = student.transform(images)
    own, _ = teacher.detector.transform(images)
    for (h, w), (th, tw) in zip(mine.image_sizes, own.image_sizes, strict=True):
        assert 0 <= th - 2 * h <= 1 and 0 <= tw - 2 * w <= 1  # each image lands where expected
    batch = teacher.batch(images, mine.tensors)
    assert batch.shape[-2:] == tuple(2 * n for n in mine.tensors.shape[-2:])
    hh, ww = (
        min(batch.shape[-2], own.tensors.shape[-2]),
        min(batch.shape[-1], own.tensors.shape[-1]),
    )
    assert torch.equal(batch[..., :hh, :ww], own.tensors[..., :hh, :ww])
    assert batch[..., hh:, :].abs().sum() == 0 and batch[..., :, ww:].abs().sum() == 0


def test_a_teacher_at_twice_the_input_gives_every_level_on_the_students_grid() -> None:
    torch.manual_seed(0)
    student = build_detector(S2, 3).eval()
    teacher = FrozenTeacher(build_detector(T2, 3), scale=2)
    images = _odd_images()
    with FeatureRecorder(student) as rec:
        student(images)
        theirs = teacher.view(images, rec.images.tensors)
        mine = rec.levels()
    assert list(theirs.levels) == list(mine) == ["p2", "p3", "p4", "p5", "p6"]
    for name, f in mine.items():
        assert theirs.levels[name].shape[-2:] == f.shape[-2:], name
    raw = list(theirs.raw.values())
    assert raw[0].shape[-2:] == tuple(2 * n for n in mine["p2"].shape[-2:])
    # the student's cell j sits where the teacher's cell 2j does: the pooled cell is centred
    # there, the mean of that cell and its eight neighbours (fewer at the border)
    p2 = theirs.levels["p2"]
    t = raw[0]
    assert torch.allclose(p2[..., 3, 5], t[..., 5:8, 9:12].mean((-2, -1)), atol=1e-5)
    assert torch.allclose(p2[..., 0, 0], t[..., :2, :2].mean((-2, -1)), atol=1e-5)
    # the top level is every other cell of the one below, for the student and so for the teacher
    assert torch.equal(mine["p6"], mine["p5"][..., ::2, ::2])
    assert torch.equal(theirs.levels["p6"], theirs.levels["p5"][..., ::2, ::2])


def test_a_teacher_at_twice_the_input_answers_the_students_rois_where_they_lie_for_it() -> None:
    # the RoIs and image sizes double onto the teacher's image: its answer is the one the same
    # detector (a copy: the RoI pooler keeps the scales it first inferred) gives at scale 1 to
    # the doubled RoIs on its own batch
    torch.manual_seed(0)
    detector = build_detector(T2, 3)
    twice = FrozenTeacher(detector, scale=2)
    once = FrozenTeacher(copy.deepcopy(detector), scale=1)
    images = _odd_images()
    mine, _ = build_detector(S2, 3).eval().transform(images)
    seen = twice.view(images, mine.tensors)
    rois = [torch.tensor([[2.0, 3.0, 20.0, 30.0], [10.0, 5.0, 40.0, 25.0]])] * len(images)
    got = twice.heads(seen.raw, rois, mine.image_sizes)
    ref = once.heads(seen.raw, [r * 2 for r in rois], [(2 * h, 2 * w) for h, w in mine.image_sizes])
    assert torch.equal(got.class_logits, ref.class_logits)
    assert torch.equal(got.box_deltas, ref.box_deltas)
    # small RoIs pool from the finest level at its stride on the teacher's image (1/4)
    pooler = twice.detector.roi_heads.box_roi_pool
    assert pooler.scales[0] == 0.25
    with pytest.raises(ValueError, match="objectness"):
        twice.heads(seen.raw, rois, mine.image_sizes, objectness=True)


@pytest.mark.parametrize("method", ["mimic", "hmkd"])
def test_a_student_distils_from_a_teacher_at_twice_its_input(method: str) -> None:
    torch.manual_seed(0)
    distiller = build_distiller(
        DistillSpec(method=method),
        levels=("p2", "p3", "p4"),
        student_channels=16,
        teacher_channels=32,
    )
    teacher = FrozenTeacher(build_detector(T2, 3), scale=2)
    response = ResponseDistiller(1.0, 2.0, box_weight=1.0)
    module = TrainModule(build_detector(S2, 3), distiller, teacher, response)
    module.train()
    _, targets = _batch()
    losses = module([torch.rand(3, 50, 71), torch.rand(3, 64, 45)], targets)
    distill = [k for k in losses if k.startswith("distill.")]
    assert {"distill.loss_response", "distill.loss_response_box"} <= set(distill)
    assert len(distill) > 2 and all(torch.isfinite(losses[k]) for k in distill)
    sum(losses.values()).backward()
    assert module.student.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.detector.parameters())
