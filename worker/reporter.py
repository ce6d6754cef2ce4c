"""`DbReporter`: how a training process reports to the service, through the database.

It runs in the training process (rank 0 of a distributed run), never in the Celery worker, and
is pickled into spawned processes, so it holds plain data only (a URL, ids, numbers) and opens
its database connection lazily in whichever process uses it.

Every write is its own short transaction and a failed write is logged, not raised: a database
hiccup (SQLite busy, a PostgreSQL failover) must not kill hours of training. Progress writes
are throttled; the last iteration is always written. `should_stop` reads the job row at most
once per `check_seconds`, which is how a cancel request or a lost lease reaches the training
loop within seconds (Celery's revoke does not stop a running task).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from hmkd_core.engine.reporter import Progress, Reporter
from jobs.artifacts import ArtifactStore
from jobs.db import session_scope
from jobs.lifecycle import is_held
from jobs.models import Artifact, Job, JobState
from jobs.progress import (
    forget_missing_artifacts,
    record_artifact,
    record_evaluation,
    record_progress,
    record_start,
)
from jobs.schemas import MAX_RUNTIME_STOP, PREEMPT_STOP

log = logging.getLogger(__name__)
LOG_EVERY_S = 60.0  # a progress line in the job's log at least this often


def jsonable(obj: Any) -> Any:
    """Metrics as strict JSON: PostgreSQL's JSON type rejects NaN and tensors are not JSON."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item"):  # a 0-d tensor or numpy scalar
        return jsonable(obj.item())
    return str(obj)


class DbReporter(Reporter):
    """Writes a job's progress, evaluations and artifacts; says stop on cancel or lost lease.

    `job_dir` is the job's folder in the artifact store: artifact names are relative to it
    (`run/checkpoints/attempt-1/ckpt_00000100.pt`). `supervisor_pid`, when set, is the worker
    process that owns the lease: if it is gone nobody renews the lease, so the run stops itself.
    """

    def __init__(
        self,
        *,
        database_url: str,
        job_id: str,
        worker: str,
        attempt: int,
        job_dir: str | Path,
        metric_name: str = "AP",
        throttle_seconds: float = 2.0,
        check_seconds: float = 1.0,
        supervisor_pid: int | None = None,
        max_runtime_s: float | None = None,
        storage: dict[str, str | None] | None = None,
    ) -> None:
        self.database_url = database_url
        # object storage settings (`jobs.storage.storage_from`); None: the folder is shared
        self.storage = storage
        self.job_id = job_id
        self.worker = worker
        self.attempt = attempt  # with `worker`, the fencing token of every write
        self.job_dir = str(job_dir)
        self.metric_name = metric_name
        self.throttle_seconds = throttle_seconds
        self.check_seconds = check_seconds
        self.supervisor_pid = supervisor_pid
        self.max_runtime_s = max_runtime_s
        self.started = time.time()  # this attempt's training process began (pickled along)
        self._reset_state()

    @property
    def store(self) -> ArtifactStore:
        """The job's artifact store, built where it is used: a storage client does not pickle."""
        if getattr(self, "_store", None) is None:
            from jobs.storage import storage_from

            root = Path(self.job_dir).parent
            self._store = ArtifactStore(root, storage_from(root, **(self.storage or {})))
        return self._store

    def _reset_state(self) -> None:
        self._last_write = -math.inf
        self._last_logged: tuple[float, int] = (-math.inf, -1)  # (when, tenth of the run)
        self._last_check = -math.inf
        self._stop = False
        self.stop_reason: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_last_write", "_last_logged", "_last_check", "_stop", "stop_reason", "_store"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_state()

    # ---- reporter protocol ---------------------------------------------------------------
    def on_start(self, *, total: int, start_iteration: int, out_dir: Path) -> None:
        log.info("job %s: starting at iteration %d of %d", self.job_id, start_iteration, total)
        try:
            with session_scope(self.database_url) as session:
                record_start(
                    session,
                    self.job_id,
                    worker=self.worker,
                    attempt=self.attempt,
                    iteration=start_iteration,
                    total=total,
                )
        except Exception as err:
            log.warning("job %s: start not recorded: %s", self.job_id, err)

    def _log_progress(self, progress: Progress, now: float) -> None:
        """A line in the job's log at each tenth of the run and at least every
        LOG_EVERY_S: the losses a user reads in `hmkd logs` when a run goes wrong."""
        tenth = 10 * progress.iteration // max(progress.total, 1)
        when, logged_tenth = self._last_logged
        if tenth == logged_tenth and now - when < LOG_EVERY_S:
            return
        self._last_logged = (now, tenth)
        parts = "  ".join(f"{k} {v:.4g}" for k, v in progress.losses.items())
        speed = f"  {progress.images_per_s:.2f} img/s" if progress.images_per_s else ""
        eta = f"  ETA {progress.eta_s:.0f} s" if progress.eta_s else ""
        log.info(
            "iteration %d/%d  loss %.4g (%s)  lr %.3g%s%s",
            progress.iteration, progress.total, progress.loss, parts, progress.lr, speed, eta,
        )  # fmt: skip

    def on_progress(self, progress: Progress) -> None:
        now = time.monotonic()
        self._log_progress(progress, now)
        last = progress.iteration >= progress.total
        if not last and now - self._last_write < self.throttle_seconds:
            return
        self._last_write = now
        try:
            with session_scope(self.database_url) as session:
                cancel = record_progress(
                    session,
                    self.job_id,
                    worker=self.worker,
                    attempt=self.attempt,
                    iteration=progress.iteration,
                    total=progress.total,
                    images_per_s=progress.images_per_s,
                    eta_s=progress.eta_s,
                    lr=progress.lr,
                    losses=dict(progress.losses),
                )
        except Exception as err:  # a progress point is not worth a training run
            log.warning("job %s: progress write failed: %s", self.job_id, err)
            return
        if cancel:
            self._request_stop("cancel requested")

    def on_evaluation(self, iteration: int, metrics: dict[str, Any]) -> None:
        shown = "  ".join(
            f"{k} {100 * v:.1f}"
            for k, v in metrics.items()
            if k.startswith("AP") and isinstance(v, int | float)
        )
        log.info("evaluation at iteration %d: %s", iteration, shown)
        try:
            with session_scope(self.database_url) as session:
                record_evaluation(
                    session,
                    self.job_id,
                    worker=self.worker,
                    attempt=self.attempt,
                    iteration=iteration,
                    metrics=jsonable(metrics),
                    metric_name=self.metric_name,
                )
        except Exception as err:
            log.warning("job %s: evaluation write failed: %s", self.job_id, err)

    def on_artifact(self, kind: str, path: Path) -> None:
        """Register a file as soon as it exists, so a run that fails later still lists it."""
        path = Path(path)
        try:
            name = path.resolve().relative_to(Path(self.job_dir).resolve()).as_posix()
        except ValueError:
            log.warning("job %s: artifact %s lies outside %s", self.job_id, path, self.job_dir)
            return
        try:
            if self.may_write():  # published before it is registered: a row means a copy
                self.store.publish(self.job_id, name)
            with session_scope(self.database_url) as session:
                row = record_artifact(
                    session,
                    self.job_id,
                    worker=self.worker,
                    attempt=self.attempt,
                    name=name,
                    kind=kind,
                    path=path,
                )
                if row is None:
                    log.warning("job %s: %s not registered: lease lost", self.job_id, name)
                elif kind == "checkpoint":
                    # resuming now starts from this attempt's checkpoints: earlier attempts'
                    # are dropped, and with them the rows of those pruned (checkpoint.keep)
                    registered = session.scalars(
                        select(Artifact.name).where(Artifact.job_id == self.job_id)
                    ).all()
                    self.store.prune_earlier_attempts(self.job_id, self.attempt, list(registered))
                    forget_missing_artifacts(session, self.job_id, self.store)
                    # with object storage, the API reads the log from there: bring it up to date
                    self.store.publish(self.job_id, "logs.txt")
        except Exception as err:
            log.warning("job %s: artifact %s not registered: %s", self.job_id, name, err)

    def may_write(self) -> bool:
        """Read now, never throttled: does this attempt still hold the job? A process that
        cannot tell (the database is down) does not write either: the lease has slack, and a
        checkpoint missed is cheaper than one written into another attempt's run."""
        try:
            with session_scope(self.database_url) as session:
                held = is_held(session, self.job_id, self.worker, self.attempt)
        except Exception as err:
            log.warning("job %s: could not read the lease: %s", self.job_id, err)
            return False
        if not held:
            self._request_stop("lease lost (another attempt holds the job)")
        return held

    def should_stop(self) -> bool:
        if self._stop:
            return True
        now = time.monotonic()
        if now - self._last_check < self.check_seconds:
            return False
        self._last_check = now
        try:
            with session_scope(self.database_url) as session:
                row = session.execute(
                    select(
                        Job.cancel_requested,
                        Job.preempt_requested,
                        Job.lease_owner,
                        Job.attempt,
                        Job.state,
                    ).where(Job.id == self.job_id)
                ).one_or_none()
        except Exception as err:
            log.warning("job %s: could not read the job row: %s", self.job_id, err)
            row = False  # unknown: the supervisor check below still applies
        # ownership first: a lost lease must be the stop's reason even if the worker is gone
        if row is None:
            self._request_stop("the job no longer exists")
        elif row and (
            row.lease_owner != self.worker
            or row.attempt != self.attempt
            or row.state != JobState.running.value
        ):
            self._request_stop(
                f"lease lost (job is {row.state}, attempt {row.attempt} owned by {row.lease_owner})"
            )
        elif row and row.cancel_requested:
            self._request_stop("cancel requested")
        elif row and row.preempt_requested:
            self._request_stop(f"{PREEMPT_STOP}: asked to give the worker back")
        elif self.supervisor_pid is not None and not _alive(self.supervisor_pid):
            self._request_stop(f"worker process {self.supervisor_pid} is gone")
        elif self.max_runtime_s is not None and time.time() - self.started > self.max_runtime_s:
            self._request_stop(f"{MAX_RUNTIME_STOP} ({self.max_runtime_s:.0f} s)")
        return self._stop

    def on_end(self, status: str, message: str | None = None) -> None:
        log.info("job %s: training %s%s", self.job_id, status, f": {message}" if message else "")

    def _request_stop(self, reason: str) -> None:
        if not self._stop:
            log.info("job %s: stopping: %s", self.job_id, reason)
        self._stop = True
        self.stop_reason = reason


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
