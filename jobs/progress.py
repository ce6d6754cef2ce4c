"""What a running job writes: progress, evaluations, artifacts, worker heartbeats.

Writes come from the training process's rank 0 through the worker's reporter, throttled, each
in its own short transaction: SQLite is shared with the API and the heartbeat. Every write for
a job is fenced by the lease of its attempt (`lifecycle.held_by`): it first updates the job row
under that condition, which takes the row's write lock, and writes nothing when another
attempt holds the job, so a training process that was frozen, or whose worker was presumed
dead, cannot add to (or overwrite) what the job's current attempt records.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from jobs.artifacts import ArtifactStore, file_sha256
from jobs.lifecycle import held_by
from jobs.models import Artifact, Evaluation, Job, MetricPoint, Worker, utcnow

_CKPT_ITERATION = re.compile(r"ckpt_(\d+)\.pt$")


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def record_start(
    session: Session,
    job_id: str,
    *,
    worker: str,
    attempt: int,
    iteration: int,
    total: int | None = None,
) -> bool:
    """An attempt starts (or resumes) at `iteration`: the job's progress says so at once,
    instead of showing the previous attempt's last figures until the first progress point."""
    values: dict[str, Any] = {"iteration": iteration, "images_per_s": None, "eta_s": None}
    if total is not None:
        values["total_iterations"] = total
    result = session.execute(
        update(Job)
        .where(held_by(job_id, worker, attempt))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def record_progress(
    session: Session,
    job_id: str,
    *,
    worker: str,
    attempt: int,
    iteration: int,
    total: int,
    images_per_s: float | None,
    eta_s: float | None,
    lr: float | None,
    losses: dict[str, float],
) -> bool:
    """Update the job row and append a metric point; returns whether a cancel was requested."""
    clean = {k: _finite(v) for k, v in losses.items()}
    owned = session.execute(
        update(Job)
        .where(held_by(job_id, worker, attempt))
        .values(
            iteration=iteration,
            total_iterations=total,
            images_per_s=_finite(images_per_s),
            eta_s=_finite(eta_s),
            lr=_finite(lr),
            losses=clean,
        )
        .execution_options(synchronize_session=False)
    )
    if owned.rowcount != 1:  # a worker that lost its lease writes nothing
        return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))
    session.add(
        MetricPoint(
            job_id=job_id,
            attempt=attempt,
            iteration=iteration,
            lr=_finite(lr),
            images_per_s=_finite(images_per_s),
            losses=clean,
        )
    )
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def holds(session: Session, job_id: str, *, worker: str, attempt: int) -> bool:
    """Take the job row's write lock if this attempt still holds the lease; else False."""
    result = session.execute(
        update(Job)
        .where(held_by(job_id, worker, attempt))
        .values(updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def record_evaluation(
    session: Session,
    job_id: str,
    *,
    worker: str,
    attempt: int,
    iteration: int,
    metrics: dict[str, Any],
    metric_name: str,
) -> bool:
    """Store an evaluation; keep the job's latest and best (by `metric_name`) at hand.
    Returns False, writing nothing, when this attempt no longer holds the job."""
    if not holds(session, job_id, worker=worker, attempt=attempt):
        return False
    session.add(Evaluation(job_id=job_id, iteration=iteration, metrics=metrics))
    job = session.get(Job, job_id)
    if job is None:
        return False
    job.latest_eval = metrics
    value = metrics.get(metric_name)
    best = (job.best_eval or {}).get(metric_name)
    if value is not None and (best is None or value > best):
        job.best_eval = metrics
    return True


def record_artifact(
    session: Session,
    job_id: str,
    *,
    worker: str,
    attempt: int,
    name: str,
    kind: str,
    path: Path,
    sha256: str | None = None,
) -> Artifact | None:
    """Register (or refresh) a file of the job, with its size and sha256 (`sha256` when the
    caller has hashed it already); None, registering nothing, when this attempt no longer
    holds the job."""
    if not holds(session, job_id, worker=worker, attempt=attempt):
        return None
    stat = path.stat()
    sha = sha256 or file_sha256(path)
    artifact = session.scalar(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)
    )
    if artifact is None:
        artifact = Artifact(job_id=job_id, name=name, kind=kind, size=stat.st_size, sha256=sha)
        session.add(artifact)
    else:
        artifact.kind, artifact.size, artifact.sha256 = kind, stat.st_size, sha
        artifact.created_at = utcnow()
    session.flush()
    return artifact


def latest_checkpoint(
    session: Session, job_id: str, job_dir: Path, store: ArtifactStore | None = None
) -> tuple[Path, int] | None:
    """The newest checkpoint an attempt registered whose file is still the one registered
    (same size and sha256), with its iteration; None when there is none. A file that is not
    registered, or was changed since, is never resumed from: only a write fenced by a current
    lease can be registered. With `store`, a checkpoint another machine wrote is fetched from
    its storage first."""
    rows = session.execute(
        select(Artifact.name, Artifact.size, Artifact.sha256).where(
            Artifact.job_id == job_id, Artifact.kind == "checkpoint"
        )
    ).all()
    found = []
    for name, size, sha in rows:
        match = _CKPT_ITERATION.search(name)
        if match is not None:
            found.append((int(match.group(1)), name, size, sha))
    for iteration, name, size, sha in sorted(found, reverse=True):
        path = job_dir / name
        if store is not None and not path.is_file():
            store.fetch(job_id, name)
        if path.is_file() and path.stat().st_size == size and file_sha256(path) == sha:
            return path, iteration
    return None


def forget_missing_artifacts(session: Session, job_id: str, store: ArtifactStore) -> None:
    """Drop rows of files that exist neither here nor in the storage (pruned checkpoints)."""
    for artifact in session.scalars(select(Artifact).where(Artifact.job_id == job_id)):
        if store.job_dir(job_id).joinpath(artifact.name).is_file():
            continue
        if not store.shared and store.storage.size(job_id, artifact.name) is not None:
            continue
        session.delete(artifact)


def heartbeat_worker(
    session: Session,
    *,
    name: str,
    queues: list[str],
    gpus: list[dict[str, Any]],
    current_job_id: str | None,
) -> None:
    worker = session.get(Worker, name)
    if worker is None:
        session.add(Worker(name=name, queues=queues, gpus=gpus, current_job_id=current_job_id))
    else:
        worker.queues, worker.gpus = queues, gpus
        worker.current_job_id = current_job_id
        worker.heartbeat_at = utcnow()
