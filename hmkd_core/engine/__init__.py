"""Training engine: the trainer, its run directory, and the reporter protocol."""

from hmkd_core.engine.reporter import Progress, Reporter, StopAfter
from hmkd_core.engine.run import RunDirError, RunResult, TrainingError, train

__all__ = [
    "Progress",
    "Reporter",
    "RunDirError",
    "RunResult",
    "StopAfter",
    "TrainingError",
    "train",
]
