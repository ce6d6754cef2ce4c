"""The training process: what a job's task starts to run hmkd_core (`python -m worker.child`).

Training runs in its own, freshly started interpreter (not a fork), for three reasons. A crash
or an OOM kill of training ends that process only, and the Celery worker survives to record the
failure. CUDA is first touched there: CUDA initialised before a `fork` breaks the children, and
the Celery worker forks its pool. And a Celery pool process is daemonic, which multiprocessing
forbids to have children, while a plain subprocess is fine (and may start its per-GPU
processes in turn).

The task passes a `TrainRequest` as JSON on stdin; the process's stdout and stderr (and those of
the per-GPU processes it starts, which inherit them) are the job's `logs.txt`, opened for
appending, so a retried job keeps the logs of its earlier attempts. The outcome is written as
JSON to `request.result_path`: a process that dies without writing it was killed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TRACEBACK_LINES = 20


@dataclass(frozen=True)
class TrainRequest:
    """Everything the training process needs, as plain JSON-able data."""

    job_id: str
    spec: dict[str, Any]  # the job's resolved JobSpec, as JSON
    run_dir: str
    result_path: str
    database_url: str
    worker: str
    attempt: int  # with `worker`, the fencing token of every write for the job
    job_dir: str
    throttle_seconds: float
    supervisor_pid: int
    checkpoint_dir: str  # this attempt's own folder
    resume_from: str | None = None  # the newest checkpoint a current lease registered
    storage: dict[str, str | None] | None = None  # object storage (`jobs.storage.storage_from`)
    node_rank: int = 0  # a multi-node job's node this process group part runs on (0: the lease's)
    nodes: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainRequest:
        return cls(**json.loads(text))


def main(request: TrainRequest) -> int:
    """Train, then write the result JSON; the exit code is 0 unless training failed."""
    # Ctrl-C in the terminal of `hmkd serve` reaches the whole process group: leave it to the
    # Celery worker to shut down (as its pool processes do). If the worker goes, the reporter
    # sees it, checkpoints and stops; the lease then expires and the job resumes elsewhere.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging()
    result = outcome_of(run, request)
    write_result(request, result)
    return 1 if result["status"] == "failed" else 0


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def outcome_of(fn: Any, request: TrainRequest) -> dict[str, Any]:
    """`fn(request)`'s result dict, or a failed one saying what it raised (even SystemExit)."""
    try:
        result: dict[str, Any] = fn(request)
    except BaseException as err:  # report everything, even SystemExit from a library
        tb = traceback.format_exc()
        sys.stderr.write(tb)
        result = {
            "status": "failed",
            "error": f"{type(err).__name__}: {err}",
            "traceback": "".join(tb.splitlines(keepends=True)[-TRACEBACK_LINES:]),
        }
    sys.stdout.flush()
    sys.stderr.flush()
    return result


def write_result(request: TrainRequest, result: dict[str, Any]) -> None:
    tmp = Path(request.result_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, request.result_path)


def reporter_for(request: TrainRequest, spec: Any) -> Any:
    """The reporter that writes the run's progress to the database, fenced by the lease."""
    from worker.reporter import DbReporter

    return DbReporter(
        database_url=request.database_url,
        job_id=request.job_id,
        worker=request.worker,
        attempt=request.attempt,
        job_dir=request.job_dir,
        metric_name=spec.train_spec().eval.metric,
        throttle_seconds=request.throttle_seconds,
        supervisor_pid=request.supervisor_pid,
        max_runtime_s=spec.resources.max_runtime_s,
        storage=request.storage,
    )


def run(request: TrainRequest) -> dict[str, Any]:
    from hmkd_core.engine import train
    from jobs.schemas import JobSpec

    spec = JobSpec.model_validate(request.spec)
    train_spec = spec.train_spec()
    check_gpus(spec.resources.gpus)
    run_dir = Path(request.run_dir)
    reporter = reporter_for(request, spec)
    logging.getLogger(__name__).info(
        "training job %s in %s (resume from %s, nproc=%d, device=%s)",
        request.job_id,
        run_dir,
        request.resume_from or "nothing",
        train_spec.runtime.nproc,
        train_spec.runtime.device,
    )
    if spec.kind == "evaluate":
        from hmkd_core.engine.evaluate import evaluate_spec

        evaluate_spec(train_spec, run_dir, reporter)
        return {"status": "succeeded", "iteration": 0, "stop": None}
    result = train(
        train_spec,
        run_dir,
        reporter=reporter,
        checkpoint_dir=request.checkpoint_dir,
        resume_from=request.resume_from,
    )
    return {"status": result.status, "iteration": result.iteration, "stop": reporter.stop_reason}


class NotEnoughGpus(RuntimeError):
    """The job asks for more GPUs than this worker has; it would oversubscribe them."""


def check_gpus(wanted: int) -> None:
    """Fail clearly, before building anything, when the worker cannot give `wanted` GPUs."""
    if wanted == 0:
        return
    import torch  # CUDA is first initialised here, in the training process

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < wanted:
        raise NotEnoughGpus(
            f"resources.gpus is {wanted} but this worker sees {have} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): submit "
            "to a queue whose workers have enough GPUs, or ask for fewer"
        )


if __name__ == "__main__":
    sys.exit(main(TrainRequest.from_json(sys.stdin.read())))
