"""`TensorBoardReporter`: a run's losses, lr, images/s and evaluations as TensorBoard events.

The trainer always adds it next to the caller's reporter, so every run directory has a
`tensorboard/` folder that `tensorboard --logdir <run dir>` (or a service's artifact download)
can plot without a database. Only rank 0 reports, so only rank 0 writes.

The `SummaryWriter` is made on first use, in the process that reports: a reporter is pickled
into spawned ranks and an open writer (a file and a thread) cannot travel. A run that resumes
from iteration N opens its writer with `purge_step=N+1`, so the events the interrupted run wrote
past its checkpoint (work now redone) are dropped when read, as `metrics.jsonl` is trimmed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hmkd_core.engine.reporter import Progress, Reporter

log = logging.getLogger(__name__)


def numeric_items(metrics: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) of every finite number in a (nested) metric dict; `per_category` becomes
    `per_category/<name>`. Booleans, strings and None (a range without ground truth) are left
    out: TensorBoard plots numbers only, and a missing point says "no data" better than 0."""
    for key, value in metrics.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from numeric_items(value, f"{tag}/")
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int | float) and math.isfinite(value):
            yield tag, float(value)
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # tensor/numpy scalar
            number = float(value.item())
            if math.isfinite(number):
                yield tag, number


class TensorBoardReporter(Reporter):
    """Writes `loss/<component>`, `loss/total`, `lr`, `images_per_s` and `eval/<metric>`
    scalars, stepped by iteration, into `log_dir`."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._purge_step: int | None = None
        self._writer: Any = None
        self._disabled = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_writer"] = None
        return state

    def _get_writer(self) -> Any:
        if self._writer is None and not self._disabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # the package is optional at run time: never fail a run
                log.warning("tensorboard is not installed (%s); no event files are written", err)
                self._disabled = True
                return None
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(self.log_dir), purge_step=self._purge_step)
        return self._writer

    # ---- reporter protocol ---------------------------------------------------------------
    def on_start(self, *, total: int, start_iteration: int, out_dir: Path) -> None:
        # Steps above the start belong to an earlier attempt's unsaved work: purge them. On a
        # fresh run (start 0) this also drops a failed earlier attempt's events, as
        # metrics.jsonl is trimmed, and opening the writer here puts the purge marker first.
        self.close()
        self._purge_step = start_iteration + 1
        self._get_writer()

    def on_progress(self, progress: Progress) -> None:
        writer = self._get_writer()
        if writer is None:
            return
        step = progress.iteration
        for name, value in progress.losses.items():
            writer.add_scalar(f"loss/{name}", value, step)
        writer.add_scalar("loss/total", progress.loss, step)
        writer.add_scalar("lr", progress.lr, step)
        writer.add_scalar("images_per_s", progress.images_per_s, step)

    def on_evaluation(self, iteration: int, metrics: dict[str, Any]) -> None:
        writer = self._get_writer()
        if writer is None:
            return
        for tag, value in numeric_items(metrics):
            if tag != "iteration":
                writer.add_scalar(f"eval/{tag}", value, iteration)
        writer.flush()  # evaluations are rare and worth seeing at once

    def on_end(self, status: str, message: str | None = None) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close the event file; a later report opens a new one."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
