"""ORM models (SQLAlchemy 2). One schema for SQLite and PostgreSQL; Alembic owns its history.

Times are timezone-aware UTC. JSON columns hold what the API returns as-is (specs, loss dicts,
metric dicts). Tokens are stored as sha256 hashes: the plain token is shown once at creation.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.expression import false as sa_false


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class JobState(enum.StrEnum):
    waiting = "waiting"  # for the teacher job it names to succeed; then queued
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})


class Team(Base):
    __tablename__ = "teams"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # at most this many of the team's jobs run at once; None: the deployment's default
    max_running: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # what a succeeded job keeps of its checkpoints (a `Retention`); None: keep the default
    retention: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # fair share: the team's weight against the others' (jobs.scheduling), and the most GPUs
    # its jobs may hold at once (None: no quota)
    share: Mapped[float] = mapped_column(Float, default=1.0, server_default="1.0")
    gpu_quota: Mapped[int | None] = mapped_column(Integer, nullable=True)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    team: Mapped[Team] = relationship()


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex
    prefix: Mapped[str] = mapped_column(String(32))  # shown in listings, never enough to use
    name: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    user: Mapped[User] = relationship()


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key", name="uq_jobs_user_idempotency"),
        Index("ix_jobs_team_created", "team_id", "created_at"),
        Index("ix_jobs_state_queue", "state", "queue"),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))  # train | distill | evaluate
    method: Mapped[str] = mapped_column(String(20), default="none")
    queue: Mapped[str] = mapped_column(String(100))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    gpus: Mapped[int] = mapped_column(Integer, default=0)  # per node
    nodes: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # machines
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # the validated JobSpec, as submitted
    resolved_spec: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # teacher refs resolved
    teacher_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))

    state: Mapped[str] = mapped_column(String(20), default=JobState.queued.value, index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    dispatched: Mapped[bool] = mapped_column(Boolean, default=False)  # outbox flag
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # asked to checkpoint and give its worker back (preemption, a worker shutting down); the
    # job returns to the queue without using one of its attempts
    preempt_requested: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=sa_false()
    )

    iteration: Mapped[int] = mapped_column(Integer, default=0)
    total_iterations: Mapped[int] = mapped_column(Integer, default=0)
    images_per_s: Mapped[float | None] = mapped_column(Float)
    eta_s: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    losses: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    latest_eval: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    best_eval: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class MetricPoint(Base):
    """One progress record: losses and lr at an iteration (the series the API plots)."""

    __tablename__ = "metric_points"
    __table_args__ = (Index("ix_metric_points_job_iter", "job_id", "iteration"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    iteration: Mapped[int] = mapped_column(Integer)
    lr: Mapped[float | None] = mapped_column(Float)
    images_per_s: Mapped[float | None] = mapped_column(Float)
    losses: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Evaluation(Base):
    __tablename__ = "evaluations"
    __table_args__ = (Index("ix_evaluations_job_iter", "job_id", "iteration"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    iteration: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(300))  # relative path inside the job's folder
    kind: Mapped[str] = mapped_column(String(30))  # student | checkpoint | best | eval | logs ...
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobEvent(Base):
    """What happened to a job, in order: submitted, dispatched, claimed, lease expired, ..."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job", "job_id", "id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(Text, default="")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobNode(Base):
    """One machine of a multi-node job's current attempt: the worker reserved for node `rank`
    (rank 0 is the worker holding the job's lease, which hosts the rendezvous)."""

    __tablename__ = "job_nodes"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(200), index=True)  # the worker's name (hostname)
    # reserved -> running -> ended | failed | lost
    state: Mapped[str] = mapped_column(String(20), default="reserved", server_default="reserved")
    endpoint: Mapped[str | None] = mapped_column(String(300))  # rank 0: the rendezvous host:port
    # rank 0: the checkpoint (artifact name) every node of the attempt resumes from
    resume_from: Mapped[str | None] = mapped_column(String(500))
    detail: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class Worker(Base):
    """A worker's heartbeat: which queues it serves and what GPUs it owns."""

    __tablename__ = "workers"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    queues: Mapped[list[Any]] = mapped_column(JSON)
    gpus: Mapped[list[Any]] = mapped_column(JSON)  # [{"index": 0, "name": "..."}]
    current_job_id: Mapped[str | None] = mapped_column(String(32))
    # shutting down: it finishes (or releases) what it runs and starts nothing new
    draining: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Dataset(Base):
    """One version of a team's dataset: COCO splits with what they hold.

    Uploaded datasets live in the dataset store under their archive's sha256 (`root`);
    registered ones are server folders under the dataset roots (`root` None, absolute paths in
    `splits`). Specs name them `dataset: <name>[@<version>]`.
    """

    __tablename__ = "datasets"
    __table_args__ = (
        UniqueConstraint("team_id", "name", "version", name="uq_datasets_team_name_version"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(20))  # upload | path
    splits: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"train": {"images", "annotations"}}
    stats: Mapped[dict[str, Any]] = mapped_column(JSON)  # per split: SplitSummary.as_dict()
    size: Mapped[int] = mapped_column(BigInteger, default=0)  # bytes on the server
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DatasetUpload(Base):
    """An archive arriving in chunks; the next chunk must start at `received`."""

    __tablename__ = "dataset_uploads"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    name: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(BigInteger)
    received: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
