"""What the API answers. Requests are `jobs.schemas.JobSpec`; these are the public views.

Views are built from ORM rows here and nowhere else, so the SSE stream, the job list and the
single-job answer all describe a job the same way.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from jobs.models import Artifact, Evaluation, Job


def _utc(t: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; they were written as UTC."""
    if t is None:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


class EvaluationPublic(BaseModel):
    iteration: int
    metrics: dict[str, Any] = Field(description="COCO metrics: AP, AP50, AP75, AP_S, AP_M, ...")
    created_at: datetime

    @classmethod
    def from_row(cls, row: Evaluation) -> EvaluationPublic:
        return cls(iteration=row.iteration, metrics=row.metrics, created_at=_utc(row.created_at))


class JobPublic(BaseModel):
    """A job as its owner's team sees it: where it stands and how it is doing."""

    id: str
    name: str
    kind: str
    method: str
    queue: str
    priority: int
    gpus: int = Field(description="GPUs per node (0: CPU).")
    nodes: int = Field(1, description="Machines the job spans (`resources.nodes`).")
    state: Literal["waiting", "queued", "running", "succeeded", "failed", "cancelled"]
    attempt: int = Field(description="Attempts started so far (a resumed job counts each).")
    max_attempts: int
    cancel_requested: bool
    dispatched: bool = Field(description="Whether its message reached the broker yet.")
    progress: float = Field(description="Percent of the schedule's iterations done, 0..100.")
    iteration: int
    total_iterations: int
    eta_s: float | None = Field(None, description="Seconds left, estimated by the trainer.")
    images_per_s: float | None
    lr: float | None
    losses: dict[str, Any] | None = Field(None, description="Latest loss components.")
    latest_eval: dict[str, Any] | None
    best_eval: dict[str, Any] | None
    error: str | None
    queue_position: int | None = Field(
        None, description="1-based place among queued jobs of its queue; null unless queued."
    )
    teacher_job_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    spec: dict[str, Any] | None = Field(None, description="The spec as submitted (single job).")
    warnings: list[str] = Field(
        default_factory=list,
        description="What the checks at submit found legal but likely a mistake, e.g. a "
        "category without boxes (single job).",
    )

    @classmethod
    def from_job(
        cls,
        job: Job,
        *,
        position: int | None = None,
        with_spec: bool = False,
        warnings: list[str] | None = None,
    ) -> JobPublic:
        total = job.total_iterations or 0
        progress = 100.0 if job.state == "succeeded" else 0.0
        if total > 0 and job.state != "succeeded":
            progress = round(min(100.0, 100.0 * job.iteration / total), 2)
        return cls(
            id=job.id,
            name=job.name,
            kind=job.kind,
            method=job.method,
            queue=job.queue,
            priority=job.priority,
            gpus=job.gpus,
            nodes=job.nodes,
            state=job.state,  # type: ignore[arg-type]
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            cancel_requested=job.cancel_requested,
            dispatched=job.dispatched,
            progress=progress,
            iteration=job.iteration,
            total_iterations=total,
            eta_s=job.eta_s,
            images_per_s=job.images_per_s,
            lr=job.lr,
            losses=job.losses,
            latest_eval=job.latest_eval,
            best_eval=job.best_eval,
            error=job.error,
            queue_position=position,
            teacher_job_id=job.teacher_job_id,
            created_at=_utc(job.created_at),
            started_at=_utc(job.started_at),
            finished_at=_utc(job.finished_at),
            updated_at=_utc(job.updated_at),
            spec=job.spec if with_spec else None,
            warnings=warnings or [],
        )


class JobList(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` for the next page; null on the last page."
    )


class MetricSeries(BaseModel):
    """Columns of equal length, one entry per recorded iteration (latest attempt wins)."""

    iteration: list[int]
    lr: list[float | None]
    images_per_s: list[float | None]
    losses: dict[str, list[float | None]] = Field(
        description="One column per loss component; null where a point lacks it."
    )
    evaluations: list[EvaluationPublic]


class Deleted(BaseModel):
    """What a deletion removed."""

    id: str = Field(description="The job's id.")
    name: str | None = Field(None, description="The artifact deleted; null for a whole job.")
    freed_bytes: int


class ArtifactPublic(BaseModel):
    name: str = Field(description="Path inside the job's folder, e.g. run/student.pt.")
    kind: str
    size: int
    sha256: str
    created_at: datetime

    @classmethod
    def from_row(cls, row: Artifact) -> ArtifactPublic:
        return cls(
            name=row.name,
            kind=row.kind,
            size=row.size,
            sha256=row.sha256,
            created_at=_utc(row.created_at),
        )


class ArtifactLinkRequest(BaseModel):
    name: str = Field(
        min_length=1,
        max_length=300,
        pattern=r"^[^\x00-\x1f\x7f-\x9f]+$",
        description="The artifact, e.g. run/student.pt (no control characters).",
    )


class ArtifactLink(BaseModel):
    url: str = Field(description="Path under the API's address; GET it without a token.")
    expires_at: datetime = Field(description="The download must start before this time.")


class UserPublic(BaseModel):
    name: str
    team: str
    is_admin: bool


class QueuedJob(BaseModel):
    id: str
    name: str
    position: int
    priority: int


class QueueStats(BaseModel):
    name: str
    queued: int
    running: int
    jobs: list[QueuedJob] = Field(description="Your team's queued jobs, in the order they run.")


class WorkerPublic(BaseModel):
    name: str
    queues: list[Any]
    gpus: list[Any]
    current_job_id: str | None = Field(None, description="Shown only for your team's jobs.")
    heartbeat_age_s: float
    started_at: datetime


class QueueOverview(BaseModel):
    queues: list[QueueStats]
    workers: list[WorkerPublic]
    team_disk_bytes: int = Field(0, description="Bytes of the artifacts your team's jobs keep.")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


class Readiness(BaseModel):
    ready: bool
    database: str = Field(description="ok, or why not")
    broker: str = Field(description="ok, or why not")


class Problem(BaseModel):
    """Every error answer: `detail` says what went wrong and what to do."""

    detail: Any
