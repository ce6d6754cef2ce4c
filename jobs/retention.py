"""What jobs keep on disk: checkpoint retention after success, deletion of jobs and artifacts,
and the disk each team uses.

Checkpoints are most of a job's bytes (a full training state per save) and are worth little
once the job has succeeded and exported `student.pt`. Retention follows Determined's rule:
keep the newest N and the best, drop the rest; the policy is the job's own
(`spec.retention`), else its team's (`hmkd teams retention`), else keep 1 latest and the best.

Deleting moves the job's folder aside first (one rename, under the artifacts root as a hidden
name), then deletes the rows, then the folder: a failure between the two leaves either the
whole job or a hidden folder that `purge_deleted` removes, never rows without files.
"""

from __future__ import annotations

import logging
import re
import shutil
import uuid
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from jobs.artifacts import ArtifactNameError, ArtifactStore, artifact_kind
from jobs.lifecycle import Conflict, NotFound, add_event, lock_job
from jobs.models import TERMINAL, Artifact, Job, JobState, Team
from jobs.schemas import Retention
from jobs.storage import StorageError

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^run/checkpoints/(?:attempt-(\d+)/)?ckpt_(\d+)\.pt$")
_DELETED_PREFIX = ".deleted-"


def policy_of(session: Session, job: Job) -> Retention:
    """The retention in force for `job`: its spec's, else its team's, else the default."""
    own = (job.spec or {}).get("retention")
    if own is not None:
        return Retention.model_validate(own)
    team = session.scalar(select(Team.retention).where(Team.id == job.team_id))
    return Retention.model_validate(team) if team is not None else Retention()


def _checkpoint_order(name: str) -> tuple[int, int] | None:
    m = _CHECKPOINT.match(name)
    return (int(m.group(1) or 0), int(m.group(2))) if m else None


def apply_retention(session: Session, store: ArtifactStore, job: Job) -> list[str]:
    """Delete what the policy does not keep of a succeeded job's checkpoints (files and rows);
    returns the names removed. Anything else is left alone, and so is a job not succeeded."""
    if job.state != JobState.succeeded:
        return []
    policy = policy_of(session, job)
    rows = list(session.scalars(select(Artifact).where(Artifact.job_id == job.id)))
    periodic = sorted(
        (r for r in rows if _checkpoint_order(r.name) is not None),
        key=lambda r: _checkpoint_order(r.name) or (0, 0),
        reverse=True,
    )
    doomed = periodic[policy.keep_latest :]
    if not policy.keep_best:
        doomed += [r for r in rows if artifact_kind(r.name) == "best"]
    removed, freed = [], 0
    for row in doomed:
        try:
            store.resolve(job.id, row.name).unlink(missing_ok=True)
            store.discard(job.id, row.name)
        except ArtifactNameError:
            continue
        except StorageError as err:  # kept in the bucket, and on record, until next time
            log.warning("job %s: %s not removed from storage: %s", job.id, row.name, err)
            continue
        removed.append(row.name)
        freed += row.size
        session.delete(row)
    if removed:
        add_event(
            session,
            job.id,
            "retention",
            f"removed {len(removed)} checkpoint(s), {freed / 2**20:.1f} MiB "
            f"(keep_latest={policy.keep_latest}, keep_best={policy.keep_best})",
            attempt=job.attempt,
        )
    session.flush()
    return removed


def _users_of(session: Session, job: Job, store: ArtifactStore) -> list[str]:
    """Ids of the jobs not yet ended that will read files of `job` (its student as their
    teacher, or as weights to start from or evaluate)."""
    # the folder as stored in specs (unresolved) and as it resolves: either may be written
    folders = {str(store.job_dir(job.id)), str(store.job_dir(job.id).resolve())}
    live = session.execute(
        select(Job.id, Job.teacher_job_id, Job.resolved_spec).where(
            Job.team_id == job.team_id, Job.state.not_in([s.value for s in TERMINAL])
        )
    ).all()
    users = []
    for job_id, teacher_id, resolved in live:
        paths = [
            str(((resolved or {}).get(model) or {}).get("weights") or "")
            for model in ("teacher", "student")
        ]
        if teacher_id == job.id or any(p.startswith(f + "/") for p in paths for f in folders):
            users.append(job_id)
    return users


def delete_job(session: Session, store: ArtifactStore, job: Job) -> int:
    """Delete an ended job: its files, rows, events and metrics; returns the bytes freed.
    Conflict while it may still run, or while a job not yet ended will read its files."""
    lock_job(session, job)
    if job.state not in TERMINAL:
        raise Conflict(f"job {job.id} is {job.state}: cancel it first, then delete it")
    users = _users_of(session, job, store)
    if users:
        raise Conflict(
            f"job {job.id}'s student is the weights of job(s) {', '.join(users)}, which have "
            "not ended: cancel them or wait for them first"
        )
    freed = int(
        session.scalar(
            select(func.coalesce(func.sum(Artifact.size), 0)).where(Artifact.job_id == job.id)
        )
        or 0
    )
    folder = store.job_dir(job.id)
    aside = store.root / f"{_DELETED_PREFIX}{job.id}-{uuid.uuid4().hex[:8]}"
    moved = folder.is_dir()
    if moved:
        folder.rename(aside)
    try:
        session.execute(
            update(Job)
            .where(Job.teacher_job_id == job.id)
            .values(teacher_job_id=None)
            .execution_options(synchronize_session=False)
        )
        session.delete(job)
        session.flush()
    except Exception:
        if moved:
            aside.rename(folder)
        raise
    session.commit()
    if moved:
        shutil.rmtree(aside, ignore_errors=True)
    try:
        store.discard(job.id)
    except StorageError as err:  # the job is gone; its objects are left under its prefix
        log.warning("job %s deleted; its objects in storage were not: %s", job.id, err)
    return freed


def delete_artifact(session: Session, store: ArtifactStore, job: Job, name: str) -> int:
    """Delete one file of an ended job (a checkpoint no longer wanted, say); returns its size.
    Conflict while the job may still write it."""
    lock_job(session, job)
    if job.state not in TERMINAL:
        raise Conflict(f"job {job.id} is {job.state}: its files change until it ends")
    path = store.resolve(job.id, name)
    row = session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name))
    if row is None or not (path.is_file() or store.storage.size(job.id, name) is not None):
        raise NotFound(f"job {job.id} has no artifact {name!r}")
    if name == "run/student.pt" and _users_of(session, job, store):
        raise Conflict(f"job {job.id}'s student is the weights of jobs that have not ended")
    size = row.size
    path.unlink(missing_ok=True)
    store.discard(job.id, name)
    session.delete(row)
    add_event(session, job.id, "artifact_deleted", name, attempt=job.attempt)
    session.flush()
    return size


def purge_deleted(store: ArtifactStore) -> list[Path]:
    """Remove folders a deletion moved aside but could not remove (a crash in between)."""
    gone = []
    for folder in store.root.glob(f"{_DELETED_PREFIX}*"):
        shutil.rmtree(folder, ignore_errors=True)
        gone.append(folder)
    return gone


def disk_by_team(session: Session) -> dict[int, int]:
    """Bytes of registered artifacts per team id."""
    return {
        team_id: int(total)
        for team_id, total in session.execute(
            select(Job.team_id, func.sum(Artifact.size))
            .join(Artifact, Artifact.job_id == Job.id)
            .group_by(Job.team_id)
        ).all()
    }
