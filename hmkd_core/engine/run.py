"""`train()`: the library's entry point, shared by `hmkd train` and the service's workers.

It owns the run directory (checkpoints/, student.pt, eval.json, metrics.jsonl, spec.yaml,
result.json), starts one process per device, and turns a child's failure into an exception the
caller can show. Rank 0 writes `result.json` so the outcome survives the processes.
"""

from __future__ import annotations

import json
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
import yaml

from hmkd_core.engine import distributed
from hmkd_core.engine.checkpoint import CheckpointManager
from hmkd_core.engine.determinism import deterministic
from hmkd_core.engine.reporter import Reporter
from hmkd_core.spec import TrainSpec

log = logging.getLogger(__name__)


class RunDirError(RuntimeError):
    """The output folder holds another run; resume it or choose a new folder."""


class TrainingError(RuntimeError):
    """A run failed; the message is the cause, its checkpoints stay on disk."""


@dataclass
class RunResult:
    status: str  # succeeded | stopped
    iteration: int
    out_dir: Path
    metrics: dict[str, Any] | None

    @property
    def student_path(self) -> Path:
        return self.out_dir / "student.pt"


def train(
    spec: TrainSpec,
    out_dir: str | Path,
    *,
    reporter: Reporter | None = None,
    resume: bool = False,
    nproc: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
) -> RunResult:
    """Train (plain or distilled) per `spec` into `out_dir`; `nproc` overrides the spec's.

    `checkpoint_dir` (default `out_dir/checkpoints`) is where this run writes its checkpoints;
    `resume_from` names the checkpoint to resume from, wherever it lies. A service gives each
    attempt of a job its own folder and resumes only from a checkpoint it registered, so a
    stale process of an earlier attempt can never write what the next one reads.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpts = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir / "checkpoints"
    if resume_from is not None:
        resume_from = Path(resume_from)
    elif resume:
        resume_from = CheckpointManager(ckpts, keep=1).latest()
    elif ckpts.is_dir() and any(ckpts.glob("ckpt_*.pt")):
        raise RunDirError(f"{ckpts} already holds checkpoints: pass --resume or a new --out")
    if nproc is not None:
        spec = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"nproc": nproc})})
    (out_dir / "spec.yaml").write_text(
        yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    )
    result_file = out_dir / "result.json"
    result_file.unlink(missing_ok=True)
    reporter = reporter or Reporter()
    try:
        distributed.launch(
            _rank_main,
            spec.runtime.nproc,
            spec.model_dump_json(),
            str(out_dir),
            reporter,
            str(ckpts),
            str(resume_from) if resume_from is not None else None,
        )
    except mp.ProcessRaisedException as err:
        reporter.on_end("failed", _last_line(str(err)))
        raise TrainingError(_last_line(str(err))) from None
    except mp.ProcessExitedException as err:
        reporter.on_end("failed", str(err))
        raise TrainingError(f"a training process died: {err}") from None
    except Exception as err:
        reporter.on_end("failed", str(err))
        raise
    data = json.loads(result_file.read_text())
    reporter.on_end(data["status"])
    return RunResult(data["status"], data["iteration"], out_dir, data.get("metrics"))


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    spec_json: str,
    out_dir: str,
    reporter: Reporter,
    checkpoint_dir: str,
    resume_from: str | None,
) -> None:
    run_rank(
        rank,
        world_size,
        f"tcp://127.0.0.1:{port}",
        TrainSpec.model_validate_json(spec_json),
        out_dir,
        reporter,
        checkpoint_dir,
        resume_from,
    )


def run_rank(
    rank: int,
    world_size: int,
    init_method: str,
    spec: TrainSpec,
    out_dir: str | Path,
    reporter: Reporter,
    checkpoint_dir: str | Path,
    resume_from: str | Path | None,
    local_rank: int | None = None,
) -> None:
    """One process of a run: join the group, train, and (rank 0) write `result.json`.

    `train()` starts these itself; a multi-node job's processes are started by torchrun on
    every node and call it directly (`worker.rank`), with `init_method` env://.
    """
    from hmkd_core.engine.trainer import Trainer

    with deterministic(spec.runtime.deterministic):
        ctx = distributed.init(rank, world_size, spec.runtime.device, init_method, local_rank)
        try:
            trainer = Trainer(
                spec, Path(out_dir), ctx, reporter, checkpoint_dir=Path(checkpoint_dir)
            )
            status = trainer.run(resume_from=Path(resume_from) if resume_from else None)
            if ctx.is_main:
                result = {
                    "status": status,
                    "iteration": trainer.iteration,
                    "metrics": trainer.last_eval,
                }
                (Path(out_dir) / "result.json").write_text(json.dumps(result, default=str))
        except Exception:
            if world_size > 1:
                log.error("rank %d failed:\n%s", rank, traceback.format_exc())
            raise
        finally:
            distributed.shutdown()


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text
