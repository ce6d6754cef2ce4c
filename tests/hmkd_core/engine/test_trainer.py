"""The trainer end to end on tiny SmallDigits: exact resume, DDP, failure, distillation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hmkd_core.data import DatasetError
from hmkd_core.engine import RunDirError, StopAfter, TrainingError, train
from hmkd_core.engine.reporter import Progress, Reporter
from hmkd_core.engine.trainer import NonFiniteLossError
from hmkd_core.models import load_student
from tests.conftest import export_tiny_student, tiny_model, tiny_spec


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_plain_training_writes_the_run_directory(tiny_digits: dict, tmp_path: Path) -> None:
    result = train(tiny_spec(tiny_digits), tmp_path)
    assert result.status == "succeeded" and result.iteration == 4
    for name in ("student.pt", "eval.json", "metrics.jsonl", "spec.yaml", "result.json"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "checkpoints").glob("ckpt_*.pt"))
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert {"AP", "AP_S", "AP50", "AP75", "AP_M", "AP_L", "AR@100", "per_category"} <= set(ev)
    assert {"AP_S_input", "AP_tiny_input", "AP_xsmall_input"} <= set(ev)  # one resize factor
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [x for x in lines if "losses" in x]
    assert [x["iteration"] for x in losses] == [1, 2, 3, 4]
    assert all(k.startswith("student.") for k in losses[0]["losses"])
    _model, header = load_student(tmp_path / "student.pt")
    assert header.metrics["AP"] == ev["AP"]
    shown = json.loads((tmp_path / "predictions.json").read_text())
    assert 0 < len(shown["images"]) <= 8 and all(i["truth"] for i in shown["images"])


def test_predictions_keep_the_confident_detections_of_the_first_images(
    tiny_digits: dict, tmp_path: Path
) -> None:
    from hmkd_core.data import CocoDetectionDataset
    from hmkd_core.engine.evaluate import write_predictions

    val = CocoDetectionDataset(tiny_digits["val_images"], tiny_digits["val_annotations"])
    first = min(a["image_id"] for a in val.coco.dataset["annotations"])
    category = val.categories[0]["id"]
    results = [
        {"image_id": first, "category_id": category, "bbox": [1, 2, 3, 4], "score": 0.9},
        {"image_id": first, "category_id": category, "bbox": [5, 6, 7, 8], "score": 0.1},
    ]
    shown = json.loads(write_predictions(val, results, tmp_path / "p.json").read_text())
    image = shown["images"][0]
    assert image["image_id"] == first
    assert image["detections"] == [
        {"bbox": [1.0, 2.0, 3.0, 4.0], "category": val.categories[0]["name"], "score": 0.9}
    ]
    assert len(image["truth"]) == len(val.coco.imgToAnns[first])


def test_existing_run_needs_resume(tiny_digits: dict, tmp_path: Path) -> None:
    train(tiny_spec(tiny_digits, schedule={"iterations": 1}, eval={"every": 0}), tmp_path)
    with pytest.raises(RunDirError, match="--resume"):
        train(tiny_spec(tiny_digits), tmp_path)


@pytest.mark.parametrize("method", ["none", "hmkd", "hmkd+response"])
def test_stopped_and_resumed_equals_uninterrupted(
    method: str, tiny_digits: dict, tiny_teacher: Path, tmp_path: Path
) -> None:
    extra = {}
    if method != "none":
        method, _, response = method.partition("+")
        extra = {
            "teacher": tiny_model(backbone="resnet34", fpn_channels=32, weights=str(tiny_teacher)),
            # the stop falls after the distiller's alignment (2 iterations), the resume too
            "distill": {
                "method": method,
                "align_iters": 2,
                "response": {
                    "weight": 1.0 if response else 0.0,
                    "temperature": 2.0,
                    "box_weight": 1.0 if response else 0.0,
                    "objectness_weight": 1.0 if response else 0.0,
                },
            },
        }
    spec = tiny_spec(
        tiny_digits, schedule={"iterations": 6, "scheduler": "step", "steps": [0.5]}, **extra
    )
    whole = train(spec, tmp_path / "whole")
    stopped = train(spec, tmp_path / "split", reporter=StopAfter(3))
    assert stopped.status == "stopped" and stopped.iteration == 3
    assert not (tmp_path / "split" / "student.pt").exists()
    resumed = train(spec, tmp_path / "split", resume=True)
    assert resumed.status == "succeeded" and whole.status == "succeeded"
    a, b = _weights(whole.student_path), _weights(resumed.student_path)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"
    # a run that stopped keeps an honest metrics log: iterations 1..6 once each
    records = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    its = [r["iteration"] for r in map(json.loads, records) if "losses" in r]
    assert [i for i in its] == sorted(set(its))


def test_evaluating_during_training_leaves_the_trained_weights_unchanged(
    tiny_digits: dict, tmp_path: Path
) -> None:
    # an evaluation that drew from the training RNG would make every weight depend on how
    # often a run was evaluated, and a benchmark's stages on its evaluation code
    runs = {
        every: train(
            tiny_spec(tiny_digits, schedule={"iterations": 4}, eval={"every": every}),
            tmp_path / str(every),
        )
        for every in (0, 1)
    }
    lines = (tmp_path / "1" / "metrics.jsonl").read_text().splitlines()
    assert sum("eval" in json.loads(x) for x in lines) >= 4  # it did evaluate at every step
    a, b = (_weights(r.student_path) for r in runs.values())
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_two_process_gloo_ddp(tiny_digits: dict, tmp_path: Path) -> None:
    spec = tiny_spec(tiny_digits, schedule={"iterations": 3})
    result = train(spec, tmp_path, nproc=2)
    assert result.status == "succeeded"
    assert result.metrics is not None and result.metrics["AP"] is not None
    model, _ = load_student(tmp_path / "student.pt")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_non_finite_loss_names_component_and_keeps_checkpoint(
    tiny_digits: dict, tmp_path: Path
) -> None:
    spec = tiny_spec(
        tiny_digits,
        schedule={"iterations": 5, "lr": 1e30, "clip_grad_norm": None, "warmup_iters": 0},
        checkpoint={"every": 1},
    )
    with pytest.raises(NonFiniteLossError, match=r"student\.loss_\w+.*iteration [2-5]"):
        train(spec, tmp_path)
    assert list((tmp_path / "checkpoints").glob("ckpt_*.pt"))
    assert not (tmp_path / "student.pt").exists()


def test_a_non_finite_step_is_refused_before_any_weight_or_state_moves(
    tiny_digits: dict, tmp_path: Path
) -> None:
    # The check runs after the backward (so the device is not idle while the host waits); the
    # update, the clipping and the schedule must still never see the bad step.
    from hmkd_core.engine.distributed import DistContext
    from hmkd_core.engine.reporter import Reporter
    from hmkd_core.engine.trainer import Trainer

    spec = tiny_spec(tiny_digits, schedule={"iterations": 3, "clip_grad_norm": 1.0})
    ctx = DistContext(rank=0, world_size=1, device=torch.device("cpu"))
    trainer = Trainer(spec, tmp_path, ctx, Reporter(), checkpoint_dir=tmp_path / "ckpt")
    images, targets = next(trainer._batches())
    trainer.step(images, targets)  # one good step: the optimizer has state to compare
    weights = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    optimizer = [{k: v.clone() for k, v in st.items()} for st in trainer.optimizer.state.values()]
    lr = trainer.optimizer.param_groups[0]["lr"]
    bad = [torch.full_like(images[0].as_subclass(torch.Tensor), float("nan")), *images[1:]]
    with pytest.raises(NonFiniteLossError, match="became non-finite"):
        trainer.step(bad, targets)
    after = trainer.module.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    for before, now in zip(optimizer, trainer.optimizer.state.values(), strict=True):
        assert all(torch.equal(before[k], now[k]) for k in before)
    assert trainer.optimizer.param_groups[0]["lr"] == lr


def test_failure_in_a_child_process_reaches_the_caller(tiny_digits: dict, tmp_path: Path) -> None:
    spec = tiny_spec(tiny_digits, schedule={"iterations": 2, "batch_size": 8})  # 8 images / 2 ranks
    with pytest.raises(TrainingError, match="cannot fill one batch"):
        train(spec, tmp_path, nproc=2)


def test_mismatched_teacher_transform_is_refused_with_the_spec(
    tiny_digits: dict, tiny_teacher: Path
) -> None:
    teacher = tiny_model(
        backbone="resnet34", fpn_channels=32, weights=str(tiny_teacher), min_size=96, max_size=96
    )
    with pytest.raises(ValueError, match=r"teacher\.min_size: 96; .* student's input size \(64\)"):
        tiny_spec(tiny_digits, teacher=teacher, distill={"method": "mimic"})


def test_a_student_trains_from_a_teacher_at_twice_its_input(
    tiny_digits: dict, tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the teacher trained at the student's 64 px reads the images at 128 here
    from hmkd_core.engine.module import FrozenTeacher

    seen: list[tuple[int, int]] = []  # (student batch side, teacher batch side) per step
    real = FrozenTeacher.batch

    def batch(self: FrozenTeacher, images: list, student_batch: torch.Tensor) -> torch.Tensor:
        out = real(self, images, student_batch)
        seen.append((student_batch.shape[-1], out.shape[-1]))
        return out

    monkeypatch.setattr(FrozenTeacher, "batch", batch)
    teacher = tiny_model(
        backbone="resnet34", fpn_channels=32, weights=str(tiny_teacher), min_size=128, max_size=128
    )
    distill = {"method": "hmkd", "response": {"weight": 1.0, "box_weight": 1.0}}
    spec = tiny_spec(tiny_digits, teacher=teacher, distill=distill, schedule={"iterations": 2})
    result = train(spec, tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    keys = {k for row in logged for k in row.get("losses", row)}
    assert result.student_path.exists()
    assert any("response_box" in k for k in keys) and any("hm" in k for k in keys), keys
    assert seen and all(t == 2 * s for s, t in seen), seen
    with pytest.raises(ValueError, match=r"distill\.response\.objectness_weight: .* 2x"):
        tiny_spec(
            tiny_digits,
            teacher=teacher,
            distill={"method": "mimic", "response": {"objectness_weight": 1.0}},
        )


def test_evaluate_spec_scores_a_trained_file_without_training(
    tiny_digits: dict, tiny_teacher: Path, tmp_path: Path
) -> None:
    from hmkd_core.engine.evaluate import evaluate_spec

    model = tiny_model(backbone="resnet34", fpn_channels=32, weights=str(tiny_teacher))
    metrics = evaluate_spec(tiny_spec(tiny_digits, student=model), tmp_path)
    trained = json.loads((tiny_teacher.parent / "eval.json").read_text())
    assert metrics["AP"] == trained["AP"] and metrics["AP_S"] == trained["AP_S"]
    assert json.loads((tmp_path / "eval.json").read_text())["AP"] == trained["AP"]
    assert not (tmp_path / "checkpoints").exists()


def test_splits_need_only_agree_on_category_ids_and_names(
    tiny_digits: dict, tmp_path: Path
) -> None:
    """The submit check compares ids and names; the trainer compared whole category entries,
    so a `supercategory` on one split only passed the check and failed the job."""
    coco = json.loads(Path(tiny_digits["train_annotations"]).read_text())
    for c in coco["categories"]:
        c["supercategory"] = "digit"
    annotations = tmp_path / "train.json"
    annotations.write_text(json.dumps(coco))
    paths = {**tiny_digits, "train_annotations": annotations}
    result = train(tiny_spec(paths, schedule={"iterations": 1}), tmp_path / "run")
    assert result.status == "succeeded"


def test_a_validation_split_of_other_categories_is_refused_before_training(
    tiny_digits: dict, tmp_path: Path
) -> None:
    """The same rule as the submit check (`coco.check_same_categories`), for specs that reach
    the trainer without it (`hmkd train`)."""
    coco = json.loads(Path(tiny_digits["val_annotations"]).read_text())
    coco["categories"][0]["name"] = "not a digit"
    annotations = tmp_path / "val.json"
    annotations.write_text(json.dumps(coco))
    paths = {**tiny_digits, "val_annotations": annotations}
    with pytest.raises(DatasetError, match=r"val\.json: categories .*'not a digit'.* differ"):
        train(tiny_spec(paths, schedule={"iterations": 1}), tmp_path / "run")
    assert not (tmp_path / "run" / "student.pt").exists()


def test_evaluate_spec_refuses_a_student_trained_on_other_categories(
    tiny_digits: dict, tmp_path: Path
) -> None:
    """Its labels are mapped to category ids through the split's own list: the same number of
    categories named otherwise loaded fine and was scored against the wrong classes."""
    from hmkd_core.engine.evaluate import evaluate_spec
    from hmkd_core.models import WeightsError

    ours = json.loads(Path(tiny_digits["val_annotations"]).read_text())["categories"]
    names = [c["name"] for c in reversed(ours)]
    theirs = [{"id": c["id"], "name": name} for c, name in zip(ours, names, strict=True)]
    path = export_tiny_student(tmp_path / "s.pt", theirs)

    spec = tiny_spec(tiny_digits, student=tiny_model(weights=str(path)))
    with pytest.raises(WeightsError, match=r"s\.pt: trained on categories \[\(1, "):
        evaluate_spec(spec, tmp_path / "eval")
    assert not (tmp_path / "eval" / "eval.json").exists()


class _LosesTheRunAt(StopAfter):
    """A reporter whose run directory stops being its own after `iteration` iterations."""

    def should_stop(self) -> bool:
        return False

    def may_write(self) -> bool:
        return self._last < self.iteration


def test_a_run_that_may_no_longer_write_stops_without_writing(
    tiny_digits: dict, tmp_path: Path
) -> None:
    spec = tiny_spec(tiny_digits, checkpoint={"every": 2})
    result = train(spec, tmp_path / "run", reporter=_LosesTheRunAt(3))
    assert result.status == "stopped"
    # the checkpoint at 2 was written while the run was its own; none at 4, no student.pt
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("ckpt_*.pt"))
    assert names == ["ckpt_00000002.pt"]
    assert not (tmp_path / "run" / "student.pt").exists()


class _SeesDeterminism(Reporter):
    """Records whether deterministic kernels were on while the run trained."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_progress(self, progress: Progress) -> None:
        self.seen.append(torch.are_deterministic_algorithms_enabled())


@pytest.mark.parametrize("on", [True, False])
def test_runtime_deterministic_switches_kernels_for_the_run_only(
    on: bool, tiny_digits: dict, tmp_path: Path
) -> None:
    before = torch.are_deterministic_algorithms_enabled()
    reporter = _SeesDeterminism()
    spec = tiny_spec(
        tiny_digits,
        schedule={"iterations": 2},
        runtime={"seed": 0, "log_every": 1, "device": "cpu", "deterministic": on},
    )
    train(spec, tmp_path, reporter=reporter)
    assert reporter.seen == [on, on]
    assert torch.are_deterministic_algorithms_enabled() == before  # restored for the caller
