"""Read-side queries the API answers with: job pages, metric series, the queue overview.

They only read, scoped to one team, so they live beside the routes rather than in
`jobs.lifecycle`, which owns every state change.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from api.schemas import (
    EvaluationPublic,
    JobPublic,
    MetricSeries,
    QueuedJob,
    QueueOverview,
    QueueStats,
    WorkerPublic,
)
from jobs.models import Evaluation, Job, JobState, MetricPoint, User, Worker, utcnow
from jobs.retention import disk_by_team
from jobs.scheduling import queued_order
from jobs.schemas import has_control_characters


class BadCursor(ValueError):
    """A `cursor` that this API did not hand out."""


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def encode_cursor(job: Job) -> str:
    raw = json.dumps([_utc(job.created_at).isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        if not isinstance(job_id, str) or has_control_characters(job_id):
            raise ValueError(f"{job_id!r} is not a job id")
        return _utc(datetime.fromisoformat(created)), job_id
    except (binascii.Error, ValueError, TypeError) as err:
        raise BadCursor(
            "cursor is not one this API handed out; pass next_cursor unchanged"
        ) from err


def list_jobs(
    session: Session,
    user: User,
    *,
    states: Sequence[str] = (),
    kind: str | None = None,
    method: str | None = None,
    queue: str | None = None,
    name: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> tuple[list[JobPublic], str | None]:
    """One page of the team's jobs, newest first; the cursor continues after the last one."""
    stmt = select(Job).where(Job.team_id == user.team_id)
    if states:
        stmt = stmt.where(Job.state.in_(list(states)))
    if kind:
        stmt = stmt.where(Job.kind == kind)
    if method:
        stmt = stmt.where(Job.method == method)
    if queue:
        stmt = stmt.where(Job.queue == queue)
    if name:
        stmt = stmt.where(Job.name.icontains(name, autoescape=True))
    if cursor:
        created, job_id = decode_cursor(cursor)
        stmt = stmt.where(
            or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id))
        )
    stmt = stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    more = len(rows) > limit
    rows = rows[:limit]
    positions = queued_order(session, [j.queue for j in rows if j.state == JobState.queued])
    items = [JobPublic.from_job(j, position=positions.get(j.id)) for j in rows]
    return items, encode_cursor(rows[-1]) if more and rows else None


def metric_series(session: Session, job_id: str, *, since: int = 0) -> MetricSeries:
    """Columns per iteration; when a resumed attempt re-records an iteration, the last wins."""
    points = session.scalars(
        select(MetricPoint)
        .where(MetricPoint.job_id == job_id, MetricPoint.iteration >= since)
        .order_by(MetricPoint.iteration, MetricPoint.id)
    )
    latest: dict[int, MetricPoint] = {}
    for point in points:
        latest[point.iteration] = point
    ordered = [latest[i] for i in sorted(latest)]
    names = sorted({k for p in ordered for k in (p.losses or {})})
    evaluations = session.scalars(
        select(Evaluation)
        .where(Evaluation.job_id == job_id, Evaluation.iteration >= since)
        .order_by(Evaluation.iteration, Evaluation.id)
    )
    return MetricSeries(
        iteration=[p.iteration for p in ordered],
        lr=[p.lr for p in ordered],
        images_per_s=[p.images_per_s for p in ordered],
        losses={n: [(p.losses or {}).get(n) for p in ordered] for n in names},
        evaluations=[EvaluationPublic.from_row(e) for e in evaluations],
    )


def queue_overview(session: Session, user: User) -> QueueOverview:
    """Counts over everyone's jobs (they share the GPUs); ids only of the caller's team."""
    counts: dict[str, dict[str, int]] = {}
    rows = session.execute(
        select(Job.queue, Job.state, func.count())
        .where(Job.state.in_([JobState.queued.value, JobState.running.value]))
        .group_by(Job.queue, Job.state)
    )
    for queue, state, n in rows:
        counts.setdefault(queue, {"queued": 0, "running": 0})[state] = int(n)
    workers = list(session.scalars(select(Worker).order_by(Worker.name)))
    for worker in workers:
        for queue in worker.queues or []:
            counts.setdefault(str(queue), {"queued": 0, "running": 0})
    positions = queued_order(session, list(counts))
    own = session.execute(
        select(Job.id, Job.name, Job.queue, Job.priority).where(
            Job.team_id == user.team_id, Job.state == JobState.queued.value
        )
    )
    mine: dict[str, list[QueuedJob]] = {}
    for job_id, name, queue, priority in own:
        mine.setdefault(queue, []).append(
            QueuedJob(id=job_id, name=name, position=positions.get(job_id, 0), priority=priority)
        )
    stats = [
        QueueStats(
            name=name,
            queued=c["queued"],
            running=c["running"],
            jobs=sorted(mine.get(name, []), key=lambda q: q.position),
        )
        for name, c in sorted(counts.items())
    ]
    team_jobs = set(
        session.scalars(
            select(Job.id).where(
                Job.team_id == user.team_id,
                Job.id.in_([w.current_job_id for w in workers if w.current_job_id]),
            )
        )
    )
    now = utcnow()
    return QueueOverview(
        queues=stats,
        workers=[
            WorkerPublic(
                name=w.name,
                queues=w.queues or [],
                gpus=w.gpus or [],
                current_job_id=w.current_job_id if w.current_job_id in team_jobs else None,
                heartbeat_age_s=round((now - _utc(w.heartbeat_at)).total_seconds(), 3),
                started_at=_utc(w.started_at),
            )
            for w in workers
        ],
        team_disk_bytes=disk_by_team(session).get(user.team_id, 0),
    )
