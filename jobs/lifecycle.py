"""The job state machine and the claim/lease protocol.

`[waiting ->] queued -> running -> succeeded | failed | cancelled`. A distill job whose
teacher job has not succeeded yet waits; the teacher's end queues it or fails it
(`settle_dependents`), so a teacher and its student can be submitted together.

A worker may run a job only after *claiming* it in one conditional UPDATE: a queued job, or a
running one whose lease expired. Anything else is a duplicate delivery (Redis'
visibility-timeout redelivery, a re-published message) and is ignored, so a job never runs twice
at once. Leases are renewed by heartbeat; an expired lease means the worker died, and the job is
re-queued to resume from its checkpoint, at most `max_attempts` times. Lease times come from the
database's clock (`db_clock`), never from the host of the worker or API that writes them.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session

from hmkd_core.spec import NAMED_WEIGHTS, ModelSpec
from jobs.db import db_clock
from jobs.models import TERMINAL, Artifact, Job, JobEvent, JobState, Team, User, utcnow
from jobs.schemas import JOB_REF, JobSpec, control_text_field
from jobs.settings import Settings
from jobs.storage import StorageError


class JobError(Exception):
    """Base of the errors a caller can show to a user."""


class NotFound(JobError):
    pass


class Conflict(JobError):
    pass


class InvalidJob(JobError):
    """A spec that validates but cannot run here; `field` is the dotted path at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def add_event(
    session: Session, job_id: str, kind: str, message: str = "", attempt: int = 0
) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, message=message, attempt=attempt))


def visible_job(session: Session, user: User, job_id: str) -> Job:
    """The job if it belongs to the user's team; another team's job does not exist for them."""
    job = session.get(Job, job_id)
    if job is None or job.team_id != user.team_id:
        raise NotFound(f"job {job_id} not found")
    return job


def _confine_data(spec: JobSpec, settings: Settings) -> None:
    """Check the dataset paths lie under the roots and replace them, in place, by their
    resolved form: the worker opens what was checked, not a symlink swapped later."""
    from jobs.paths import PathNotAllowed, confine

    splits = [("train", spec.data.train), ("val", spec.data.val)]
    for split_name, split in splits:
        if split is None:
            continue
        for attr in ("images", "annotations"):
            field = f"data.{split_name}.{attr}"
            try:
                setattr(
                    split,
                    attr,
                    confine(getattr(split, attr), settings.dataset_roots, field=field),
                )
            except PathNotAllowed as err:
                raise InvalidJob(field, str(err).removeprefix(f"{field}: ")) from None


# A worker whose heartbeat is older than this no longer counts as serving its queues.
WORKER_SEEN_S = 3600.0


def _check_fits_a_worker(session: Session, queue: str, gpus: int, settings: Settings) -> None:
    """A job asking for more GPUs than any worker of its queue has would wait forever:
    refused at submit. A queue no worker has served recently is taken on trust (its workers
    may not have started yet)."""
    from jobs.scheduling import largest_worker

    if gpus == 0:
        return
    since = db_clock(session) - timedelta(seconds=WORKER_SEEN_S)
    largest = largest_worker(session, queue, since=since)
    if largest is not None and gpus > largest:
        raise InvalidJob(
            "resources.gpus",
            f"{gpus} GPUs, but the largest worker of queue {queue!r} has {largest}: ask for "
            f"at most {largest}, or submit to a queue of bigger machines",
        )


def _check_enough_workers(session: Session, queue: str, gpus: int, nodes: int) -> None:
    """A job spanning more machines than its queue has workers (with its GPUs each) would
    wait forever: refused at submit. Taken on trust while no worker of the queue is known."""
    if nodes == 1:
        return
    from jobs.scheduling import serving_workers

    since = db_clock(session) - timedelta(seconds=WORKER_SEEN_S)
    serving = list(serving_workers(session, queue, since=since).values())
    able = sum(1 for have in serving if have >= gpus)
    if serving and able < nodes:
        raise InvalidJob(
            "resources.nodes",
            f"{nodes} nodes with {gpus} GPU(s) each, but queue {queue!r} has {able} such "
            f"worker(s): ask for at most {able} nodes, or submit to a bigger queue",
        )


def _check_data(spec: JobSpec) -> list[str]:
    """The splits checked as the loader will check them; InvalidJob for one it would refuse,
    else the warnings to record."""
    from jobs.data_check import DataFieldError, check_data

    try:
        return check_data(spec)
    except DataFieldError as err:
        raise InvalidJob(err.field, err.message.removeprefix(f"{err.field}: ")) from None


def _check_weights(spec: JobSpec) -> None:
    """Resolved weights trained on other categories than the data's, refused (InvalidJob)."""
    from jobs.data_check import DataFieldError, check_weights

    try:
        check_weights(spec, evaluate=spec.kind == "evaluate")
    except DataFieldError as err:
        raise InvalidJob(err.field, err.message.removeprefix(f"{err.field}: ")) from None


def _job_by_prefix(session: Session, user: User, prefix: str, field: str) -> Job:
    """The team's job whose id is `prefix` or starts with it; InvalidJob when none or several."""
    found = list(
        session.scalars(
            select(Job)
            .where(Job.team_id == user.team_id, Job.id.startswith(prefix, autoescape=True))
            .limit(2)
        )
    )
    if not found:
        raise InvalidJob(field, f"no job {prefix} visible to you")
    if len(found) > 1:
        raise InvalidJob(field, f"job:{prefix} names more than one job: give more of its id")
    return found[0]


# What `job:` weights fix (`_architecture_clash`): a teacher's are taken from its student.pt
# when a spec leaves them out, and refused when a spec gives them otherwise; a student's must be
# those its weights were built with. A teacher's input transforms, when left out, follow the
# student's instead (a teacher reads the student's input size, or a whole multiple of it).
_ARCHITECTURE = ("arch", "backbone", "fpn_channels", "anchor_sizes", "backbone_norm")
_TRANSFORMS = ("min_size", "max_size", "image_mean", "image_std")


def complete_teacher(session: Session, user: User, body: Any, settings: Settings) -> Any:
    """A submitted spec (as JSON) whose teacher is `job:<id>`, with the teacher's architecture
    filled in from that job's `student.pt` and its transforms from the student, so a user need
    not copy them by hand. A field given otherwise than the weights were built with is an
    InvalidJob naming it, and so is `teacher.weights` when it names no job of the team (or
    several, or one without a student.pt): left to validation, that would be reported as the
    teacher's defaults differing from the student. Anything else unresolvable is left as it
    is, for validation and `submit_job` to report."""
    teacher = body.get("teacher") if isinstance(body, dict) else None
    if not isinstance(teacher, dict) or not isinstance(teacher.get("weights"), str):
        return body
    m = JOB_REF.match(teacher["weights"])
    if m is None:
        return body
    from hmkd_core.models.export import WeightsError, read_model_spec

    try:
        source = _job_by_prefix(session, user, m.group(1), "teacher.weights")
        if source.state == JobState.succeeded:
            path = _resolve_weights(session, user, teacher["weights"], "teacher.weights", settings)
            _fetch_student(source, settings)  # with object storage, it may be only there
            built = read_model_spec(path)
        else:  # its student.pt is still to come: what it will hold is in its spec
            built = _model_to_come(source)
    except (WeightsError, ValueError, StorageError):
        return body
    if (clash := _architecture_clash(teacher, built, m.group(1))) is not None:
        name, why = clash
        raise InvalidJob(f"teacher.{name}", f"{why}: leave it out to take it from the weights")
    built_values = built.model_dump(mode="json")
    filled = dict(teacher)
    for name in _ARCHITECTURE:
        if _follows_weights(teacher, name):
            filled[name] = built_values[name]
    student = body.get("student") if isinstance(body.get("student"), dict) else {}
    for name in _TRANSFORMS:
        if name not in teacher and name in student:
            filled[name] = student[name]
    if "min_size" in teacher and "max_size" not in teacher:
        # a teacher given only its own min_size reads the images that many times larger: its
        # max_size follows when that is a whole multiple, and is left to be refused otherwise
        filled.pop("max_size", None)
        lo, hi, given = student.get("min_size"), student.get("max_size"), teacher["min_size"]
        if all(isinstance(v, int) and v > 0 for v in (lo, hi, given)) and given % lo == 0:
            filled["max_size"] = hi * (given // lo)
    return {**body, "teacher": filled}


def _follows_weights(model: dict[str, Any], name: str) -> bool:
    """Whether the architecture field `name` of `model` (a model as JSON) is left to the
    weights: left out, or `backbone_norm: auto` (which a weights file resolves to its own)."""
    return name not in model or (name == "backbone_norm" and model[name] == "auto")


def _architecture_clash(
    model: dict[str, Any],
    built: ModelSpec,
    source: str,
    fields: tuple[str, ...] = _ARCHITECTURE,
) -> tuple[str, str] | None:
    """The first architecture field that `model` (a model as JSON) sets otherwise than
    `built`, the ModelSpec job `source`'s student.pt was written with, as (name, why); None
    when they agree. The one rule for `job:` weights, teacher's and student's alike: such
    weights load only into the detector they were built as."""
    values = built.model_dump(mode="json")
    for name in fields:
        if not _follows_weights(model, name) and model[name] != values[name]:
            return name, (
                f"{model[name]!r}, but job {source}'s student.pt is built with {values[name]!r}"
            )
    return None


def _check_student_fits(
    session: Session, user: User, spec: JobSpec, path: str, settings: Settings
) -> None:
    """InvalidJob naming `student.weights` when the spec's student is not the detector its
    `job:` weights were built as (an evaluation, or training that starts from them): the
    worker could not load them into it. Another kind of weights is left to the worker."""
    from hmkd_core.models.export import WeightsError, read_model_spec

    m = JOB_REF.match(spec.student.weights)
    if m is None:
        return
    source = _job_by_prefix(session, user, m.group(1), "student.weights")
    _fetch_student(source, settings)  # with object storage, it may be only there
    try:
        built = read_model_spec(path)
    except WeightsError as err:
        raise InvalidJob("student.weights", f"job {source.id}'s student.pt: {err}") from None
    student = spec.student.model_dump(mode="json")
    # anchor sizes shape no tensor (three aspect ratios per cell whatever the sizes): a student
    # may start from weights and train with other anchors
    shapes = tuple(name for name in _ARCHITECTURE if name != "anchor_sizes")
    if (clash := _architecture_clash(student, built, m.group(1), shapes)) is not None:
        name, why = clash
        left_out = "" if name in spec.student.model_fields_set else " (left out: its default)"
        raise InvalidJob(
            "student.weights",
            f"student.{name}{left_out} is {why}: describe the student as those weights were "
            "built, or name other weights",
        )


def _model_to_come(job: Job) -> Any:
    """The ModelSpec an unfinished job's student.pt will be written with: its student, with
    the normalisation `auto` resolves to."""
    from hmkd_core.models.builders import resolve_norm

    model = ModelSpec.model_validate(job.spec["student"])
    return model.model_copy(update={"weights": "none", "backbone_norm": resolve_norm(model)})


def _student_path(job: Job, settings: Settings) -> Path:
    from jobs.artifacts import ArtifactStore

    assert settings.artifacts_dir is not None
    return ArtifactStore(Path(settings.artifacts_dir)).run_dir(job.id) / "student.pt"


def _fetch_student(job: Job, settings: Settings) -> None:
    from jobs.artifacts import store_of

    store_of(settings).fetch(job.id, "run/student.pt")


def _resolve_weights(
    session: Session,
    user: User,
    ref: str,
    field: str,
    settings: Settings,
    *,
    pending_ok: bool = False,
) -> str:
    """`job:<id>` -> that job's student.pt; a plain path must lie under the dataset roots.

    With `pending_ok`, a job that may still succeed (waiting, queued, running) resolves to
    where its student.pt will be: the caller makes its own job wait for it."""
    from jobs.paths import PathNotAllowed, confine

    if ref in NAMED_WEIGHTS:
        return ref
    m = JOB_REF.match(ref)
    if m is None:
        try:
            path = confine(ref, settings.dataset_roots, field=field)
        except PathNotAllowed as err:
            raise InvalidJob(field, str(err).removeprefix(f"{field}: ")) from None
        if not path.is_file():
            raise InvalidJob(
                field,
                f"{ref} is not a file: name a weights file (a student.pt or a "
                "checkpoint or state dict saved by torch.save)",
            )
        return str(path)
    job = _job_by_prefix(session, user, m.group(1), field)
    if job.kind == "evaluate":
        raise InvalidJob(field, f"job {job.id} is an evaluation: it makes no student.pt")
    if job.state in (JobState.failed, JobState.cancelled):
        raise InvalidJob(field, f"job {job.id} is {job.state}: retry it, or name another job")
    if job.state != JobState.succeeded:
        if pending_ok:
            return str(_student_path(job, settings))
        raise InvalidJob(field, f"job {job.id} is {job.state}, not succeeded: wait for it")
    student = _student_path(job, settings)
    if not student.is_file() and not _student_on_record(session, job.id):
        # neither here nor in object storage
        raise InvalidJob(field, f"job {job.id} has no student.pt")
    return str(student)


STUDENT_ARTIFACT = "run/student.pt"


def _student_on_record(session: Session, job_id: str) -> bool:
    """Whether the job's `run/student.pt` is a registered artifact: what the download route
    serves, and what deleting the artifact (`DELETE .../artifacts/run/student.pt`, retention)
    or the job removes, whichever storage holds the file."""
    found = session.scalar(
        select(Artifact.id).where(Artifact.job_id == job_id, Artifact.name == STUDENT_ARTIFACT)
    )
    return found is not None


def submit_job(
    session: Session,
    *,
    user: User,
    spec: JobSpec,
    settings: Settings,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Insert a queued, undispatched job; the same idempotency key returns the first job."""
    # the Python dump: the JSON one turns a lone surrogate in a key into U+FFFD
    bad = control_text_field(spec.model_dump())
    if bad is not None:
        raise InvalidJob(
            bad, "must not contain control characters (NUL, newline, ...) or lone surrogates"
        )
    if idempotency_key is not None:
        existing = session.scalar(
            select(Job).where(Job.user_id == user.id, Job.idempotency_key == idempotency_key)
        )
        if existing is not None:
            return existing, False
    resolved = spec.model_copy(deep=True)
    if spec.dataset is not None:  # the team's dataset, read again: the body's paths are not trusted
        from jobs.datasets import find

        try:
            dataset = find(session, user, spec.dataset)
        except NotFound as err:
            raise InvalidJob("dataset", str(err)) from None
        splits = {k: dataset.splits.get(k) for k in ("train", "val")}
        resolved.data = resolved.data.model_validate({**resolved.data.model_dump(), **splits})
    else:
        _confine_data(resolved, settings)
    warnings = _check_data(resolved)
    teacher_job = None
    if resolved.teacher is not None:
        resolved.teacher.weights = _resolve_weights(
            session, user, spec.teacher.weights, "teacher.weights", settings, pending_ok=True
        )
        if (teacher_ref := spec.teacher_job_id()) is not None:
            teacher_job = _job_by_prefix(session, user, teacher_ref, "teacher.weights")
            lock_job(session, teacher_job)
    resolved.student.weights = _resolve_weights(
        session, user, spec.student.weights, "student.weights", settings
    )
    _check_student_fits(session, user, spec, resolved.student.weights, settings)
    _check_weights(resolved)
    waits = teacher_job is not None and teacher_job.state != JobState.succeeded
    queue = (
        spec.resources.queue
        if "queue" in spec.resources.model_fields_set
        else settings.default_queue
    )
    _check_fits_a_worker(session, queue, spec.resources.gpus, settings)
    _check_enough_workers(session, queue, spec.resources.gpus, spec.resources.nodes)
    quota = session.scalar(select(Team.gpu_quota).where(Team.id == user.team_id))
    total_gpus = spec.resources.gpus * spec.resources.nodes
    if quota is not None and total_gpus > quota:
        raise InvalidJob(
            "resources.gpus",
            f"{total_gpus} GPUs ({spec.resources.nodes} node(s) of {spec.resources.gpus}), but "
            f"your team's GPU quota is {quota}: it could never start; ask for fewer, or ask an "
            "administrator for a larger quota",
        )
    job = Job(
        team_id=user.team_id,
        user_id=user.id,
        name=spec.name,
        kind=spec.kind,
        method=spec.distill.method,
        queue=queue,  # a spec that names no queue goes to this deployment's default queue
        priority=spec.resources.priority,
        gpus=spec.resources.gpus,
        nodes=spec.resources.nodes,
        spec=spec.model_dump(mode="json"),
        resolved_spec=resolved.model_dump(mode="json"),
        teacher_job_id=teacher_job.id if teacher_job is not None else None,
        idempotency_key=idempotency_key,
        state=(JobState.waiting if waits else JobState.queued).value,
        max_attempts=settings.max_attempts,
        total_iterations=spec.schedule.iterations,
    )
    session.add(job)
    session.flush()
    add_event(session, job.id, "submitted", f"by {user.name}")
    for warning in warnings:
        add_event(session, job.id, "warning", warning)
    if waits:
        assert teacher_job is not None
        add_event(session, job.id, "waiting", f"for teacher job {teacher_job.id} to succeed")
    return job, True


def lock_job(session: Session, job: Job) -> None:
    """Lock the job's row and read it afresh (PostgreSQL; SQLite serialises writers anyway).

    A job about to wait for it must not miss its end: the end's transaction updates this row
    first, so either it has committed (and the state read here is final) or it waits for this
    transaction, and its `settle_dependents` then sees the new waiting job. A deletion must not
    miss a retry, or a claim after one, between its check and its delete."""
    session.execute(select(Job.id).where(Job.id == job.id).with_for_update())
    session.refresh(job)


def settle_waiting(session: Session) -> list[str]:
    """Settle the waiting jobs whose teacher has already ended (what the teacher's end does;
    the workers' sweeper runs this as a safety net); returns their ids."""
    teacher = Job.__table__.alias("teacher")
    stuck = session.execute(
        select(Job.id, Job.teacher_job_id)
        .join(teacher, teacher.c.id == Job.teacher_job_id)
        .where(
            Job.state == JobState.waiting.value,
            teacher.c.state.in_([s.value for s in TERMINAL]),
        )
    ).all()
    for _, teacher_id in stuck:
        settle_dependents(session, teacher_id)
    return [job_id for job_id, _ in stuck]


def settle_dependents(session: Session, job_id: str) -> None:
    """Once job `job_id` has ended, queue the jobs waiting for it as their teacher (it
    succeeded) or fail them with the reason (it failed or was cancelled), and so on down a
    chain of such jobs. Runs in the transaction that ended the job, so no waiting job is left
    behind by a crash between the two."""
    ended = session.execute(select(Job.state, Job.error).where(Job.id == job_id)).one_or_none()
    if ended is None or ended.state not in TERMINAL:
        return
    waiting = list(
        session.scalars(
            select(Job.id).where(Job.teacher_job_id == job_id, Job.state == JobState.waiting.value)
        )
    )
    if not waiting:
        return
    now = db_clock(session)
    if ended.state == JobState.succeeded:
        values: dict[str, object] = {"state": JobState.queued.value, "dispatched": False}
        kind, message = "queued", f"teacher job {job_id} succeeded"
    else:
        reason = f": {ended.error}" if ended.error else ""
        message = f"teacher job {job_id} {ended.state}{reason}"
        values = _ended(JobState.failed, now, error=message)
        kind = "failed"
    for dependent in waiting:
        result = session.execute(
            update(Job)
            .where(Job.id == dependent, Job.state == JobState.waiting.value)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:
            add_event(session, dependent, kind, message)
            if kind == "failed":
                settle_dependents(session, dependent)


def mark_dispatched(session: Session, job_id: str) -> None:
    # updated_at doubles as the time of the last publish for a queued job
    session.execute(
        update(Job).where(Job.id == job_id).values(dispatched=True, updated_at=utcnow())
    )
    add_event(session, job_id, "dispatched")


def pending_dispatch(
    session: Session, limit: int = 100, *, redispatch_seconds: float | None = None
) -> list[Job]:
    """Queued jobs never published, and (with `redispatch_seconds`) those published that long
    ago and still unclaimed, whose message the broker may have lost."""
    waiting = Job.dispatched.is_(False)
    if redispatch_seconds is not None:
        stale = utcnow() - timedelta(seconds=redispatch_seconds)
        waiting = or_(waiting, Job.updated_at < stale)
    stmt = (
        select(Job)
        .where(Job.state == JobState.queued.value, waiting)
        .order_by(Job.priority.desc(), Job.created_at)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def claim_job(
    session: Session,
    job_id: str,
    *,
    worker: str,
    lease_seconds: float,
    now: datetime | None = None,
    team_cap: int | None = None,
) -> Job | None:
    """Atomically take the job for `worker`, or return None (duplicate / not runnable, or its
    team already runs its cap: the team's own `max_running`, else `team_cap`)."""
    now = now or db_clock(session)
    job = session.get(Job, job_id)
    if job is None:
        return None
    if job.state == JobState.queued and _team_at_cap(session, job, team_cap, now):
        return None
    if job.attempt >= job.max_attempts and job.state in (JobState.queued, JobState.running):
        stale = job.state == JobState.queued or (
            job.lease_expires_at is not None and _aware(job.lease_expires_at) < now
        )
        if stale:
            _exhausted(session, job, now)
            return None
    claimable = _unowned(now)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, claimable, Job.cancel_requested.is_(False))
        .where(Job.attempt < Job.max_attempts)
        .values(
            state=JobState.running.value,
            lease_owner=worker,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempt=Job.attempt + 1,
            started_at=func.coalesce(Job.started_at, now),
            error=None,
            preempt_requested=False,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    session.refresh(job)
    add_event(session, job.id, "claimed", f"by {worker}", attempt=job.attempt)
    return job


def claim_next(
    session: Session,
    job_id: str,
    *,
    worker: str,
    lease_seconds: float,
    team_cap: int | None = None,
    worker_gpus: int | None = None,
    worker_fresh_s: float = 60.0,
    look_ahead: int = 20,
    now: datetime | None = None,
) -> Job | None:
    """Take the job first in line in the queue of `job_id`, whose message was delivered.

    A message is a turn to run one job of its queue, not a ticket for one job: the worker takes
    the queued job `queue_position` shows first (`jobs.scheduling.start_order`: fair share
    between teams, then priority and age). So jobs start in the order shown on every broker,
    also kombu's SQLAlchemy transport, which has no priorities, and Redis, which puts a
    re-published job at the back of its list. Every queued job has had a message published, so
    there are never fewer turns than jobs; a turn left over finds nothing. Jobs of a team at its
    cap or GPU quota are passed over, and so are jobs needing more GPUs than `worker_gpus`
    (None: any), and multi-node jobs for which not enough other workers (heartbeat within
    `worker_fresh_s`) are free now (`jobs.gang`). A worker reserved as a node of a multi-node
    job takes nothing. When nothing queued can be taken, the message's own job is tried: it
    may be running on a lease that ran out."""
    from jobs.gang import lock_worker, reserved_for, worker_of
    from jobs.scheduling import start_order

    queue = session.scalar(select(Job.queue).where(Job.id == job_id))
    if queue is None:
        return None
    lock_worker(session, worker_of(worker))
    if reserved_for(session, worker_of(worker)) is not None:
        hand_back(session, job_id)  # this worker's next task is its part of a gang
        return None
    waiting = Job.queue == queue, Job.state == JobState.queued.value
    teams = set(session.scalars(select(Job.team_id).where(*waiting).distinct()))
    # teams already at their cap are left out of the line, not merely skipped in it: a backlog
    # of theirs longer than `look_ahead` must not hide other teams' jobs
    now = now or db_clock(session)
    capped = set(_teams_at_cap(session, teams, team_cap, now))
    line = start_order(session, [queue], exclude_teams=capped, max_gpus=worker_gpus, now=now)[queue]
    about = {
        row.id: row
        for row in session.execute(
            select(Job.id, Job.team_id, Job.nodes).where(Job.id.in_(line[:look_ahead]))
        )
    }
    claim = functools.partial(
        _claim_with_gang,
        session,
        worker=worker,
        lease_seconds=lease_seconds,
        team_cap=team_cap,
        fresh_s=worker_fresh_s,
        now=now,
    )
    for candidate in line[:look_ahead]:
        if about[candidate].team_id in capped:
            continue
        job = claim(candidate, about[candidate].nodes)
        if job is not None:
            return job
        # a single-node job left queued was held by its team's cap: so are the team's others
        # (a gang may only lack free workers)
        still_queued = session.scalar(select(Job.state).where(Job.id == candidate))
        if still_queued == JobState.queued and about[candidate].nodes == 1:
            capped.add(about[candidate].team_id)
    own = session.get(Job, job_id)
    if worker_gpus is not None and own is not None and own.gpus > worker_gpus:
        hand_back(session, job_id)  # its turn went to a worker too small: publish again
        return None
    job = claim(job_id, own.nodes if own is not None else 1)
    if job is None and own is not None and own.nodes > 1:
        hand_back(session, job_id)  # its gang could not form now: published again next sweep
    return job


def _claim_with_gang(
    session: Session,
    job_id: str,
    nodes: int,
    *,
    worker: str,
    lease_seconds: float,
    team_cap: int | None,
    fresh_s: float,
    now: datetime,
) -> Job | None:
    """`claim_job`, and for a multi-node job the reservation of its other nodes in the same
    transaction: both or neither."""
    from jobs.gang import record_gang, reserve_peers, worker_of

    peers: list[str] = []
    if nodes > 1:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.queued:
            return None
        found = reserve_peers(session, job, worker_of(worker), now=now, fresh_s=fresh_s)
        if found is None:
            return None
        peers = found
    job = claim_job(
        session, job_id, worker=worker, lease_seconds=lease_seconds, team_cap=team_cap, now=now
    )
    if job is not None and job.nodes > 1:
        record_gang(session, job.id, job.attempt, worker_of(worker), peers)
        add_event(
            session,
            job.id,
            "gang",
            f"nodes: {', '.join([worker_of(worker), *peers])}",
            attempt=job.attempt,
        )
    return job


def _teams_at_cap(
    session: Session, team_ids: set[int], default: int | None, now: datetime
) -> dict[int, tuple[int, int]]:
    """Of `team_ids`, the teams that can start nothing now, each with (running, limit): those
    running as many jobs as their cap allows, or holding all the GPUs of their quota. Without
    locks: `_team_at_cap` asks again under the team's lock."""
    if not team_ids:
        return {}
    limits = {
        tid: (own if own is not None else default, quota)
        for tid, own, quota in session.execute(
            select(Team.id, Team.max_running, Team.gpu_quota).where(Team.id.in_(team_ids))
        ).all()
    }
    if all(cap is None and quota is None for cap, quota in limits.values()):
        return {}
    running = _running(session, team_ids, now)
    capped = {}
    for tid, (cap, quota) in limits.items():
        jobs, gpus = running.get(tid, (0, 0))
        if cap is not None and jobs >= cap:
            capped[tid] = (jobs, cap)
        elif quota is not None and gpus >= quota > 0:
            capped[tid] = (gpus, quota)
    return capped


def _running(session: Session, team_ids: set[int], now: datetime) -> dict[int, tuple[int, int]]:
    """Per team with live jobs: (jobs running on a live lease, GPUs they hold)."""
    return {
        tid: (int(n), int(gpus or 0))
        for tid, n, gpus in session.execute(
            select(Job.team_id, func.count(), func.sum(Job.gpus * Job.nodes))
            .where(
                Job.team_id.in_(team_ids),
                Job.state == JobState.running.value,
                Job.lease_expires_at >= now,
            )
            .group_by(Job.team_id)
        ).all()
    }


def _team_at_cap(session: Session, job: Job, default: int | None, now: datetime) -> bool:
    """Whether the job's team already runs as many jobs as it may, or would pass its GPU
    quota with this job. The team's row is locked first (PostgreSQL; SQLite serialises writers
    anyway), so two workers claiming for one team at once count one after the other. A job held
    back is published again by the next sweep."""
    row = session.execute(
        select(Team.max_running, Team.gpu_quota).where(Team.id == job.team_id).with_for_update()
    ).one()
    cap = row.max_running if row.max_running is not None else default
    if cap is None and row.gpu_quota is None:
        return False
    jobs, gpus = _running(session, {job.team_id}, now).get(job.team_id, (0, 0))
    reason = None
    if cap is not None and jobs >= cap:
        reason = f"team runs {jobs} job(s), its cap is {cap}"
    elif row.gpu_quota is not None and gpus + job.gpus * job.nodes > row.gpu_quota:
        more = job.gpus * job.nodes
        reason = f"team holds {gpus} GPU(s); {more} more pass its quota of {row.gpu_quota}"
    if reason is None:
        return False
    hand_back(session, job.id)
    add_event(session, job.id, "held", reason)
    return True


def hand_back(session: Session, job_id: str) -> None:
    """A queued job whose delivered message was not used (its team at a limit, a worker too
    small or shutting down) is marked unpublished: the next sweep publishes it again, and
    until then no message waits for it."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.queued.value)
        .values(dispatched=False)
        .execution_options(synchronize_session=False)
    )


def _ended(state: JobState, now: datetime, **extra: object) -> dict[str, object]:
    """Column values of a job that has ended: final state, end time, no lease."""
    return {
        "state": state.value,
        "finished_at": now,
        "lease_owner": None,
        "lease_expires_at": None,
        **extra,
    }


def _requeued(**extra: object) -> dict[str, object]:
    """Column values of a job back in the queue: unpublished (the sweep publishes it), no
    lease."""
    return {
        "state": JobState.queued.value,
        "dispatched": False,
        "lease_owner": None,
        "lease_expires_at": None,
        **extra,
    }


def _unowned(now: datetime) -> ColumnElement[bool]:
    """No live worker holds the job: it is queued, or running on a lease that has expired."""
    return or_(
        Job.state == JobState.queued.value,
        and_(Job.state == JobState.running.value, Job.lease_expires_at < now),
    )


def _aware(t: datetime) -> datetime:
    """SQLite hands back naive datetimes; they were written as UTC."""
    from datetime import UTC

    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _exhausted_message(attempts: int) -> str:
    return (
        f"stopped after {attempts} attempts: each attempt lost its worker (crash, OOM kill "
        "or node loss). Look at the logs, fix the cause, then retry the job."
    )


def _exhausted(session: Session, job: Job, now: datetime) -> None:
    """Fail a job out of attempts, unless someone changed it since it was read."""
    message = _exhausted_message(job.attempt)
    result = session.execute(
        update(Job)
        .where(
            Job.id == job.id,
            Job.attempt == job.attempt,
            _unowned(now),
        )
        .values(**_ended(JobState.failed, now, error=message))
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 1:
        add_event(session, job.id, "failed", message, attempt=job.attempt)
        settle_dependents(session, job.id)
    session.refresh(job)


def held_by(job_id: str, worker: str, attempt: int) -> ColumnElement[bool]:
    """The fence every write for a running job carries: this worker holds the lease of this
    very attempt. A worker presumed dead whose job was claimed again (the attempt number moved
    on) fails it, even if it comes back under the same name."""
    return and_(
        Job.id == job_id,
        Job.lease_owner == worker,
        Job.attempt == attempt,
        Job.state == JobState.running.value,
    )


def is_held(session: Session, job_id: str, worker: str, attempt: int) -> bool:
    """Read now: does this attempt still hold the job? (`progress.holds` also locks the row.)"""
    return session.scalar(select(Job.id).where(held_by(job_id, worker, attempt))) is not None


def renew_lease(
    session: Session,
    job_id: str,
    *,
    worker: str,
    attempt: int,
    lease_seconds: float,
    now: datetime | None = None,
) -> bool:
    """Extend the lease; False means this worker no longer owns the job and must stop."""
    now = now or db_clock(session)
    result = session.execute(
        update(Job)
        .where(held_by(job_id, worker, attempt))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def request_cancel(session: Session, job: Job) -> Job:
    """Queued jobs, and running ones whose worker is gone (lease expired), end at once; a
    running job with a live worker is asked to stop and its worker ends it within seconds."""
    now = db_clock(session)
    ended = session.execute(
        update(Job)
        .where(Job.id == job.id, or_(_unowned(now), Job.state == JobState.waiting.value))
        .values(**_ended(JobState.cancelled, now, cancel_requested=True))
        .execution_options(synchronize_session=False)
    )
    if ended.rowcount == 1:
        add_event(session, job.id, "cancelled", "before a worker ran it", attempt=job.attempt)
        settle_dependents(session, job.id)
    else:
        asked = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == JobState.running.value)
            .values(cancel_requested=True)
            .execution_options(synchronize_session=False)
        )
        if asked.rowcount != 1:
            session.refresh(job)
            raise Conflict(f"job {job.id} is already {job.state}")
        add_event(session, job.id, "cancel_requested", attempt=job.attempt)
    session.flush()
    session.refresh(job)
    return job


def request_preemption(
    session: Session, job: Job, reason: str, *, now: datetime | None = None
) -> Job:
    """Ask a running job to checkpoint at its next iteration and give its worker back; it
    returns to the queue (`release_job`) without using one of its attempts. Used for fair
    share, by a team freeing a worker, and by a worker shutting down."""
    now = now or db_clock(session)
    asked = session.execute(
        update(Job)
        .where(
            Job.id == job.id,
            Job.state == JobState.running.value,
            Job.lease_expires_at >= now,
            Job.cancel_requested.is_(False),
        )
        .values(preempt_requested=True)
        .execution_options(synchronize_session=False)
    )
    if asked.rowcount != 1:
        session.refresh(job)
        raise Conflict(f"job {job.id} is {job.state}: only a running job can be preempted")
    add_event(session, job.id, "preempt_requested", reason, attempt=job.attempt)
    session.flush()
    session.refresh(job)
    return job


def release_job(
    session: Session, job_id: str, *, worker: str, attempt: int, iteration: int
) -> bool:
    """Put a preempted job back in the queue, resuming from the checkpoint it just wrote; its
    attempt does not count against `max_attempts`. False when the lease was lost meanwhile."""
    cancelled = session.execute(  # a cancel that came meanwhile wins: nothing to requeue
        update(Job)
        .where(held_by(job_id, worker, attempt), Job.cancel_requested.is_(True))
        .values(**_ended(JobState.cancelled, utcnow(), preempt_requested=False))
        .execution_options(synchronize_session=False)
    )
    if cancelled.rowcount == 1:
        add_event(session, job_id, "cancelled", "while it checkpointed", attempt=attempt)
        settle_dependents(session, job_id)
        return True
    result = session.execute(
        update(Job)
        .where(held_by(job_id, worker, attempt))
        .values(**_requeued(preempt_requested=False, max_attempts=Job.max_attempts + 1))
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    add_event(
        session, job_id, "preempted", f"checkpointed at iteration {iteration}", attempt=attempt
    )
    return True


def restart_group(
    session: Session, job_id: str, *, worker: str, attempt: int, reason: str
) -> JobState | None:
    """A multi-node attempt lost a node: the whole group goes back to the queue and resumes
    from its last checkpoint, on whichever workers are free then. Unlike a preemption this uses
    an attempt, as a lost worker does; out of attempts the job fails. None when the lease was
    lost meanwhile; else the job's new state."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    now = utcnow()
    if job.cancel_requested:
        state, values = JobState.cancelled, _ended(JobState.cancelled, now)
    elif job.preempt_requested or attempt < job.max_attempts:
        # asked to give its workers back (a deploy): that attempt is not counted
        refund = {"max_attempts": Job.max_attempts + 1} if job.preempt_requested else {}
        state, values = JobState.queued, _requeued(preempt_requested=False, **refund)
    else:
        message = f"a node was lost ({reason}); {_exhausted_message(attempt)}"
        state, values = JobState.failed, _ended(JobState.failed, now, error=message)
    result = session.execute(
        update(Job)
        .where(held_by(job_id, worker, attempt))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    add_event(session, job_id, "node_lost", reason, attempt=attempt)
    if state != JobState.queued:
        settle_dependents(session, job_id)
    return state


def _check_sources_kept(session: Session, job: Job) -> None:
    """Conflict when weights the job named as `job:<id>` are gone: that job was deleted since,
    or its `run/student.pt` artifact was, so the retried job could only fail when it starts.
    A source still to succeed (a teacher retried first) has its student.pt to come."""
    from jobs.artifacts import job_of_run_file

    for model in ("student", "teacher"):
        ref = ((job.spec or {}).get(model) or {}).get("weights")
        resolved = ((job.resolved_spec or {}).get(model) or {}).get("weights")
        if not isinstance(ref, str) or not JOB_REF.match(ref) or not isinstance(resolved, str):
            continue
        source_id = job_of_run_file(resolved)
        # locked: a deletion of its student.pt then waits for this retry, and sees it queued
        source = (
            session.scalar(
                select(Job)
                .where(Job.id == source_id)
                .with_for_update()
                .execution_options(populate_existing=True)
            )
            if source_id is not None
            else None
        )
        if source is None:
            raise Conflict(
                f"job {job.id}'s {model}.weights is {ref}, a job deleted since with its "
                "student.pt: submit a new job that names other weights"
            )
        if source.state == JobState.succeeded and not _student_on_record(session, source.id):
            raise Conflict(
                f"job {job.id}'s {model}.weights is {ref}, and job {source.id}'s artifact "
                f"{STUDENT_ARTIFACT} was deleted since: submit a new job that names other "
                "weights"
            )


def retry_job(session: Session, job: Job, *, attempts: int = 3) -> Job:
    """Re-queue a failed or cancelled job with `attempts` more tries; the worker resumes from
    its last checkpoint."""
    if job.state not in (JobState.failed, JobState.cancelled):
        raise Conflict(f"job {job.id} is {job.state}; only failed or cancelled jobs can be retried")
    _check_sources_kept(session, job)
    teacher = session.get(Job, job.teacher_job_id) if job.teacher_job_id else None
    if teacher is not None:
        lock_job(session, teacher)
    if teacher is not None and teacher.state in (JobState.failed, JobState.cancelled):
        raise Conflict(
            f"job {job.id}'s teacher job {teacher.id} is {teacher.state}: retry the teacher "
            "first, then this job"
        )
    waits = teacher is not None and teacher.state != JobState.succeeded
    job.state = (JobState.waiting if waits else JobState.queued).value
    job.dispatched = False
    job.cancel_requested = False
    job.lease_owner = None
    job.lease_expires_at = None
    job.finished_at = None
    job.error = None
    job.max_attempts = job.attempt + attempts
    add_event(session, job.id, "retried", attempt=job.attempt)
    session.flush()
    return job


def finish_job(
    session: Session,
    job_id: str,
    *,
    worker: str,
    attempt: int,
    state: JobState,
    error: str | None = None,
) -> bool:
    """End the job if `worker` still owns this attempt; False when the lease was lost."""
    if state not in TERMINAL:
        raise ValueError(f"{state} is not a final state")
    result = session.execute(
        update(Job)
        .where(held_by(job_id, worker, attempt))
        .values(**_ended(state, utcnow(), error=error))
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    job = session.get(Job, job_id)
    add_event(session, job_id, state.value, error or "", attempt=job.attempt if job else 0)
    settle_dependents(session, job_id)
    return True


def requeue_expired(session: Session, now: datetime | None = None) -> list[str]:
    """Running jobs whose worker stopped renewing: re-queue them, or end them when cancelled
    or out of attempts. Each change is a conditional UPDATE on the lease that was seen, so a
    slow worker that renews or finishes meanwhile wins and nothing is overwritten."""
    now = now or db_clock(session)
    seen = session.execute(
        select(Job.id, Job.lease_owner, Job.attempt, Job.max_attempts, Job.cancel_requested).where(
            Job.state == JobState.running.value, Job.lease_expires_at < now
        )
    ).all()
    requeued = []
    for job_id, owner, attempt, max_attempts, cancel in seen:
        if cancel:
            kind, message = "cancelled", "its worker was lost"
            values = _ended(JobState.cancelled, now)
        elif attempt >= max_attempts:
            kind, message = "failed", _exhausted_message(attempt)
            values = _ended(JobState.failed, now, error=message)
        else:
            kind, message = "lease_expired", f"worker {owner} stopped renewing"
            values = _requeued()
        result = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.state == JobState.running.value,
                Job.lease_expires_at < now,
                Job.lease_owner == owner,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:
            add_event(session, job_id, kind, message, attempt=attempt)
            if kind == "lease_expired":
                requeued.append(job_id)
            else:
                settle_dependents(session, job_id)
    session.flush()
    return requeued


def queue_position(session: Session, job: Job) -> int | None:
    """1-based position among queued jobs of its queue: the order in which `claim_next`
    starts them (`jobs.scheduling.start_order`)."""
    if job.state != JobState.queued:
        return None
    from jobs.scheduling import start_order

    line = start_order(session, [job.queue])[job.queue]
    return line.index(job.id) + 1 if job.id in line else None
