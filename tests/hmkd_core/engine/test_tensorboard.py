"""TensorBoard event files of a run, the reporter fan-out, and their registration as artifacts."""

from __future__ import annotations

import pickle
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hmkd_core.engine import MultiReporter, Progress, Reporter, StopAfter, train
from hmkd_core.engine.tensorboard import TensorBoardReporter, numeric_items
from jobs.artifacts import ArtifactStore, artifact_kind
from tests.conftest import tiny_spec


def _scalars(log_dir: Path) -> dict[str, list[int]]:
    """Tag -> steps, read back as TensorBoard reads it (purges included)."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_training_writes_losses_lr_and_evaluations_and_a_resume_purges(
    tiny_digits: dict, tmp_path: Path
) -> None:
    spec = tiny_spec(tiny_digits, eval={"every": 2}, checkpoint={"every": 2})
    assert train(spec, tmp_path).status == "succeeded"
    log_dir = tmp_path / "tensorboard"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1
    steps = _scalars(log_dir)
    losses = [t for t in steps if t.startswith("loss/student.")]
    assert losses, sorted(steps)
    assert steps[losses[0]] == steps["loss/total"] == steps["lr"] == [1, 2, 3, 4]
    assert steps["images_per_s"] == [1, 2, 3, 4]
    assert steps["eval/AP"] == steps["eval/AP_S"] == [2, 4]  # periodic, then final
    assert "eval/iteration" not in steps

    # Lose the last checkpoint and resume from iteration 2: steps 3 and 4 are trained again,
    # and the first attempt's events for them must not show twice.
    max(tmp_path.glob("checkpoints/ckpt_*.pt")).unlink()
    assert train(spec, tmp_path, resume=True).status == "succeeded"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2
    steps = _scalars(log_dir)
    assert steps["loss/total"] == [1, 2, 3, 4]
    assert steps["eval/AP"] == [2, 4]


def test_a_stopped_run_closes_its_event_file(tiny_digits: dict, tmp_path: Path) -> None:
    spec = tiny_spec(tiny_digits, schedule={"iterations": 3})
    assert train(spec, tmp_path, reporter=StopAfter(2)).status == "stopped"
    assert _scalars(tmp_path / "tensorboard")["lr"] == [1, 2]


def test_event_files_are_tensorboard_artifacts(tmp_path: Path) -> None:
    name = "run/tensorboard/events.out.tfevents.1700000000.host.123.0"
    assert artifact_kind(name) == "tensorboard"
    event = tmp_path / "job1" / name
    event.parent.mkdir(parents=True)
    event.write_bytes(b"x")
    assert ArtifactStore(tmp_path).scan("job1") == [(name, "tensorboard", event)]


def test_reporter_is_picklable_and_opens_its_writer_lazily(tmp_path: Path) -> None:
    reporter = TensorBoardReporter(tmp_path / "tb")
    reporter.on_progress(Progress(1, 2, 10.0, 1.0, 0.1, {"a": 1.0}))
    clone = pickle.loads(pickle.dumps(reporter))  # an open writer would not pickle
    assert clone._writer is None
    reporter.on_end("succeeded")
    assert _scalars(tmp_path / "tb")["loss/a"] == [1]


def test_numeric_items_flattens_and_skips_non_numbers() -> None:
    metrics = {"AP": 0.5, "AP_tiny": None, "ok": True, "per_category": {"d0": 0.25, "d1": None}}
    assert dict(numeric_items(metrics)) == {"AP": 0.5, "per_category/d0": 0.25}


class _Spy(Reporter):
    def __init__(self, stop: bool, checkpoint: bool) -> None:
        self.stop, self.checkpoint, self.calls = stop, checkpoint, []

    def on_evaluation(self, iteration: int, metrics: dict) -> None:
        self.calls.append(("eval", iteration))

    def should_stop(self) -> bool:
        self.calls.append(("stop?", None))
        return self.stop

    def checkpoint_on_stop(self) -> bool:
        return self.checkpoint

    def on_end(self, status: str, message: str | None = None) -> None:
        self.calls.append(("end", status))


def test_multi_reporter_fans_out_stops_on_any_checkpoints_on_all() -> None:
    a, b = _Spy(stop=True, checkpoint=True), _Spy(stop=False, checkpoint=False)
    multi = MultiReporter(a, b)
    multi.on_evaluation(3, {"AP": 0.1})
    assert multi.should_stop() is True
    assert multi.checkpoint_on_stop() is False
    multi.on_end("stopped")
    for spy in (a, b):  # every reporter is asked, even after one said stop
        assert spy.calls == [("eval", 3), ("stop?", None), ("end", "stopped")]
    assert MultiReporter(_Spy(False, True)).should_stop() is False
    assert MultiReporter(_Spy(True, True), _Spy(False, True)).checkpoint_on_stop() is True
