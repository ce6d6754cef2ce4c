"""A reporter that draws a rich progress bar and prints evaluations.

The rich display is created in `on_start`, inside the process that trains, because a live
display cannot be pickled into a spawned training process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from hmkd_core.engine.reporter import Progress as TrainProgress
from hmkd_core.engine.reporter import Reporter


class ConsoleReporter(Reporter):
    def __init__(self, title: str = "train") -> None:
        self.title = title
        self._bar: Progress | None = None
        self._task: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"title": self.title, "_bar": None, "_task": None}

    def on_start(self, *, total: int, start_iteration: int, out_dir: Path) -> None:
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(self.title, total=total, completed=start_iteration, info="")
        if start_iteration:
            self._bar.console.print(f"resumed at iteration {start_iteration} in {out_dir}")

    def on_progress(self, progress: TrainProgress) -> None:
        if self._bar is None:
            return
        info = f"loss {progress.loss:.3f}  lr {progress.lr:.2e}  {progress.images_per_s:.1f} img/s"
        self._bar.update(self._task, completed=progress.iteration, info=info)

    def on_evaluation(self, iteration: int, metrics: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.console.print(
                f"[cyan]eval @ {iteration}[/]: AP {_pct(metrics.get('AP'))}  "
                f"AP_S {_pct(metrics.get('AP_S'))}  AP50 {_pct(metrics.get('AP50'))}"
            )

    def on_end(self, status: str, message: str | None = None) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"
