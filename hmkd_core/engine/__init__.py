"""Training engine: the trainer, its run directory, and the reporter protocol."""

from hmkd_core.engine.reporter import MultiReporter, Progress, Reporter, StopAfter
from hmkd_core.engine.run import RunDirError, RunResult, TrainingError, train
from hmkd_core.engine.tensorboard import TensorBoardReporter

__all__ = [
    "MultiReporter",
    "Progress",
    "Reporter",
    "RunDirError",
    "RunResult",
    "StopAfter",
    "TensorBoardReporter",
    "TrainingError",
    "train",
]
