"""How a run talks to whoever launched it: progress, evaluations, artifacts, and "stop now?".

The trainer calls a `Reporter` at defined points and never knows whether a terminal, a
database or a test is listening. Only rank 0 reports. A reporter handed to a multi-process run
is pickled into the child, so it must hold plain data (a URL, a path), not live connections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Progress:
    iteration: int
    total: int
    images_per_s: float
    eta_s: float
    lr: float
    losses: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return sum(self.losses.values())


class Reporter:
    """No-op base: subclasses override what they care about."""

    def on_start(self, *, total: int, start_iteration: int, out_dir: Path) -> None:
        """Called once, with the iteration the run starts (or resumes) from."""

    def on_progress(self, progress: Progress) -> None:
        """Called every `runtime.log_every` iterations."""

    def on_evaluation(self, iteration: int, metrics: dict[str, Any]) -> None:
        """Called after each COCO evaluation with the flat metric dict."""

    def on_artifact(self, kind: str, path: Path) -> None:
        """A file was written: `checkpoint`, `best`, `student`, `eval`, `metrics`, `spec`."""

    def should_stop(self) -> bool:
        """Asked every iteration; True makes the run checkpoint and return `stopped`."""
        return False

    def checkpoint_on_stop(self) -> bool:
        """Whether a stop asked by `should_stop` writes a checkpoint first. False when another
        process now owns the run directory (a service worker that lost its lease)."""
        return self.may_write()

    def may_write(self) -> bool:
        """Asked right before the run writes a checkpoint or its final files: False when the
        run directory is no longer this process's to write (the run then stops, writing
        nothing). Unlike `should_stop`, the answer must be fresh, never throttled."""
        return True

    def on_end(self, status: str, message: str | None = None) -> None:
        """`succeeded`, `stopped` or `failed` (with the error message)."""


class StopAfter(Reporter):
    """Asks the run to stop once it reached `iteration`: a deterministic interruption."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration
        self._last = 0

    def on_progress(self, progress: Progress) -> None:
        self._last = progress.iteration

    def should_stop(self) -> bool:
        return self._last >= self.iteration


class MultiReporter(Reporter):
    """Fans every call out to several reporters, in order, so the trainer can add its own
    (TensorBoard) next to the caller's without either knowing of the other.

    The run stops when any reporter asks (each is still asked, so none misses its poll), and
    checkpoints on that stop only when all agree: one that knows the run directory changed
    owner must be able to veto the write.
    """

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = list(reporters)

    def on_start(self, *, total: int, start_iteration: int, out_dir: Path) -> None:
        for r in self.reporters:
            r.on_start(total=total, start_iteration=start_iteration, out_dir=out_dir)

    def on_progress(self, progress: Progress) -> None:
        for r in self.reporters:
            r.on_progress(progress)

    def on_evaluation(self, iteration: int, metrics: dict[str, Any]) -> None:
        for r in self.reporters:
            r.on_evaluation(iteration, metrics)

    def on_artifact(self, kind: str, path: Path) -> None:
        for r in self.reporters:
            r.on_artifact(kind, path)

    def should_stop(self) -> bool:
        answers = [r.should_stop() for r in self.reporters]
        return any(answers)

    def checkpoint_on_stop(self) -> bool:
        return all(r.checkpoint_on_stop() for r in self.reporters)

    def may_write(self) -> bool:
        return all(r.may_write() for r in self.reporters)

    def on_end(self, status: str, message: str | None = None) -> None:
        for r in self.reporters:
            r.on_end(status, message)
