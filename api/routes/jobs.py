"""`/v1/jobs`: submit, list, read, follow (SSE), logs, cancel, retry and delete."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, PlainTextResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.app import celery_of
from api.deps import CurrentUser, SessionDep, SettingsDep, VisibleJob
from api.queries import BadCursor, list_jobs, metric_series
from api.schemas import Deleted, EvaluationPublic, JobList, JobPublic, MetricSeries, Problem
from hmkd_core.spec import MAX_ITERATIONS, Method, located
from jobs.datasets import complete_dataset
from jobs.db import session_scope
from jobs.lifecycle import (
    Conflict,
    NotFound,
    complete_teacher,
    mark_dispatched,
    queue_position,
    request_cancel,
    request_preemption,
    retry_job,
    submit_job,
)
from jobs.models import TERMINAL, Evaluation, Job, JobEvent, JobState
from jobs.schemas import JobSpec
from jobs.storage import Storage

log = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])

_ERRORS = {
    401: {"model": Problem, "description": "Missing or unknown token."},
    404: {"model": Problem, "description": "No such job in your team."},
}
LOG_CHUNK_BYTES = 1 << 20  # the most of a log one `logs` call reads and answers
LOG_TAIL_BLOCK_BYTES = 64 * 1024  # `tail` reads backwards in blocks of this


def _public(session: Session, job: Job, *, with_spec: bool = True) -> JobPublic:
    warnings = (
        list(
            session.scalars(
                select(JobEvent.message)
                .where(JobEvent.job_id == job.id, JobEvent.kind == "warning")
                .order_by(JobEvent.id)
            )
        )
        if with_spec
        else []
    )
    return JobPublic.from_job(
        job, position=queue_position(session, job), with_spec=with_spec, warnings=warnings
    )


def _dispatch(request: Request, session: Session, job: Job) -> None:
    """Commit, then publish; a failed publish leaves the job for the workers' sweeper. A job
    waiting for its teacher is published once the teacher's end queues it."""
    session.commit()  # the worker must find the row when the message arrives
    if job.state != JobState.queued:
        return
    try:
        from jobs.broker import publish

        publish(celery_of(request.app), job)
    except Exception:  # any broker failure: the outbox sweeper re-publishes it later
        log.warning("publishing job %s failed; it stays undispatched", job.id, exc_info=True)
        return
    mark_dispatched(session, job.id)
    session.commit()
    session.refresh(job)


def _json_int(digits: str) -> int | float:
    """A JSON integer. One longer than Python converts (4300 digits) is past every bound a
    field has: it becomes an infinite float, which the field it was given for refuses by name."""
    try:
        return int(digits)
    except ValueError:
        return float(digits)


async def _json_body(request: Request) -> Any:
    """The request's JSON, decoded but not yet validated.

    Validating a spec is left to the route, which runs in the thread pool: a body of many
    thousand unknown keys costs a second of validation, which must not stall the event loop
    (and every other request with it). Decoding itself is bounded by the body limit.
    """
    raw = await request.body()
    try:
        return json.loads(raw.decode("utf-8"), parse_int=_json_int)
    except UnicodeDecodeError as err:
        reason = f"the body is not UTF-8: {err.reason} at byte {err.start}"
        raise HTTPException(400, reason) from None
    except json.JSONDecodeError as err:
        problem = {"loc": ("body", err.pos), "msg": f"JSON: {err.msg}", "type": "json_invalid"}
        raise RequestValidationError([problem]) from None
    except RecursionError:
        problem = {"loc": ("body",), "msg": "JSON nested too deeply", "type": "json_invalid"}
        raise RequestValidationError([problem]) from None


def _spec_of(body: Any) -> JobSpec:
    try:
        return JobSpec.model_validate(body)
    except ValidationError as err:
        errors = []
        for e in err.errors(include_url=False):
            loc, msg = located(tuple(e["loc"]), e["msg"])
            errors.append({**e, "loc": ("body", *loc), "msg": msg})
        raise RequestValidationError(errors) from None


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobPublic,
    summary="Submit a job",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}},
        }
    },
    responses={
        **_ERRORS,
        200: {"model": JobPublic, "description": "The Idempotency-Key was used: that job."},
        409: {"model": Problem, "description": "Idempotency-Key reused with another spec."},
        413: {"model": Problem, "description": "Body too large."},
    },
)
def create_job(
    body: Annotated[Any, Depends(_json_body)],
    request: Request,
    response: Response,
    session: SessionDep,
    user: CurrentUser,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=200,
            pattern=r"^[\x20-\x7e]+$",  # printable ASCII: stored, and echoed in answers
            description="Retry-safe submission: the same key returns the job it first made "
            "(printable ASCII, up to 200 characters).",
        ),
    ] = None,
) -> JobPublic:
    """Validate the spec, check its dataset paths and teacher, queue it and publish it."""
    body = complete_dataset(session, user, body)
    spec = _spec_of(complete_teacher(session, user, body, settings))
    try:
        job, created = submit_job(
            session, user=user, spec=spec, settings=settings, idempotency_key=idempotency_key
        )
    except IntegrityError:  # the same key raced in from a concurrent retry: answer with it
        session.rollback()
        job, created = submit_job(
            session, user=user, spec=spec, settings=settings, idempotency_key=idempotency_key
        )
    if not created and job.spec != spec.model_dump(mode="json"):
        raise Conflict(
            f"Idempotency-Key {idempotency_key!r} already made job {job.id} from another "
            "spec; use a new key for a new job"
        )
    if created:
        _dispatch(request, session, job)
    else:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return _public(session, job)


@router.get("", response_model=JobList, summary="List your team's jobs", responses=_ERRORS)
def get_jobs(
    session: SessionDep,
    user: CurrentUser,
    state: Annotated[list[JobState] | None, Query(description="Repeat to match several.")] = None,
    kind: Literal["train", "distill", "evaluate"] | None = None,
    method: Annotated[
        Method | None,
        Query(description="Distillation method (`none` for plain training)."),
    ] = None,
    queue: Annotated[str | None, Query(max_length=100)] = None,
    name: Annotated[str | None, Query(max_length=200, description="Name contains.")] = None,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobList:
    """Newest first; follow `next_cursor` for older pages."""
    try:
        items, next_cursor = list_jobs(
            session,
            user,
            states=[s.value for s in state or []],
            kind=kind,
            method=method,
            queue=queue,
            name=name,
            cursor=cursor,
            limit=limit,
        )
    except BadCursor as err:
        raise RequestValidationError(
            [{"loc": ("query", "cursor"), "msg": str(err), "type": "value_error"}]
        ) from None
    return JobList(items=items, next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic, summary="One job", responses=_ERRORS)
def get_job(job: VisibleJob, session: SessionDep) -> JobPublic:
    """State, attempt, progress, ETA, throughput, losses, evaluations, error, queue place."""
    return _public(session, job)


@router.get(
    "/{job_id}/metrics", response_model=MetricSeries, summary="Metric series", responses=_ERRORS
)
def get_metrics(
    job: VisibleJob,
    session: SessionDep,
    since: Annotated[
        int, Query(ge=0, le=MAX_ITERATIONS, description="Only iterations >= since.")
    ] = 0,
) -> MetricSeries:
    """Loss components, lr and images/s per recorded iteration, and every evaluation."""
    return metric_series(session, job.id, since=since)


def _snapshot(
    url: str, job_id: str, after_eval: int
) -> tuple[JobPublic | None, list[tuple[int, EvaluationPublic]]]:
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        if job is None:
            return None, []
        rows = session.scalars(
            select(Evaluation)
            .where(Evaluation.job_id == job_id, Evaluation.id > after_eval)
            .order_by(Evaluation.id)
        )
        evals = [(e.id, EvaluationPublic.from_row(e)) for e in rows]
        return _public(session, job, with_spec=False), evals


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    summary="Follow a job (server-sent events)",
    responses=_ERRORS,
)
async def job_events(job: VisibleJob, request: Request) -> AsyncIterator[ServerSentEvent]:
    """A `state` event at once and on every state change, `progress` when the job row
    changes, `evaluation` per evaluation; the stream ends once the job is final."""
    url: str = request.app.state.settings.database_url
    poll: float = request.app.state.sse_poll_seconds
    job_id = job.id
    last_state: str | None = None
    last_seen: JobPublic | None = None
    after_eval = 0
    while True:
        current, evals = await anyio.to_thread.run_sync(_snapshot, url, job_id, after_eval)
        if current is None:
            return
        for eval_id, evaluation in evals:
            after_eval = eval_id
            yield ServerSentEvent(event="evaluation", data=evaluation, id=f"e{eval_id}")
        if current.state != last_state:
            yield ServerSentEvent(event="state", data=current)
        elif current != last_seen:
            yield ServerSentEvent(event="progress", data=current)
        last_state, last_seen = current.state, current
        if current.state in TERMINAL:
            return
        await anyio.sleep(poll)


def _read(storage: Storage, job_id: str, start: int, end: int) -> bytes:
    return b"".join(storage.read(job_id, "logs.txt", start, end - 1)) if end > start else b""


def _tail(
    storage: Storage,
    job_id: str,
    size: int,
    lines: int,
    *,
    cap: int = LOG_CHUNK_BYTES,
    block: int = LOG_TAIL_BLOCK_BYTES,
) -> tuple[bytes, bool]:
    """The last `lines` lines of the log's first `size` bytes, at most `cap` bytes of them, and
    whether `cap` cut them.

    A line ends at a newline; text after the last newline (a line being written) counts as one.
    Reads backwards in blocks of `block` bytes, counting each block's newlines once, and stops
    at the line wanted or `cap` + 1 bytes back (the byte before the last `cap` tells whether
    they start on a line): linear, whatever the log holds. When `cap` cuts, the answer is the
    complete lines that fit in it, or the last `cap` bytes of a line longer than that.
    """
    if size <= 0 or lines <= 0:
        return b"", False
    floor = max(0, size - cap - 1)
    blocks: list[bytes] = []
    pos, newlines, wanted, from_start = size, 0, lines, size <= cap + 1
    while pos > floor and newlines < wanted:
        step = min(block, pos - floor)
        chunk = _read(storage, job_id, pos - step, pos)
        if len(chunk) != step:  # replaced by a shorter log meanwhile: answer what was read
            from_start = True
            break
        if not blocks and chunk.endswith(b"\n"):
            wanted += 1  # the last newline ends the last line; it does not start one
        blocks.append(chunk)
        newlines += chunk.count(b"\n")
        pos -= step
    blocks.reverse()
    data = b"".join(blocks)  # the log's last bytes, at most `cap` + 1 of them
    if newlines >= wanted:  # the lines start after the `wanted`-th newline from the end
        at = len(data)
        for _ in range(wanted):
            at = data.rfind(b"\n", 0, at)
        return data[at + 1 :], False  # at most len(data) - 1 <= cap bytes
    if from_start and len(data) <= cap:
        return data, False  # fewer lines than asked: all of them
    # cut: here `data` is `cap` + 1 bytes; answer from the first line that starts in its last
    # `cap` (just after a newline), else the last `cap` bytes of the one long line
    at = data.find(b"\n", 0, len(data) - 1)
    return data[at + 1 :] if at >= 0 else data[1:], True


_LOG_HEADERS = {
    "X-Log-Offset": {
        "description": "Where the next `offset` read starts (the end of this answer).",
        "schema": {"type": "integer"},
    },
    "X-Log-Truncated": {
        "description": (
            "`true` when the answer is not all that was asked for because of the 1 MiB cap: "
            "more of the log follows `X-Log-Offset` (whole log or `offset`), or the first of "
            "the `tail` lines asked for lie before the answer (it then starts at the first "
            "complete line of the log's last 1 MiB, or is the last 1 MiB of a longer line)."
        ),
        "schema": {"type": "string", "enum": ["true", "false"]},
    },
}


@router.get(
    "/{job_id}/logs",
    response_class=PlainTextResponse,
    summary="The job's log",
    responses={
        **_ERRORS,
        200: {
            "content": {"text/plain": {}},
            "description": (
                "Log text, at most 1 MiB of the log per call; `X-Log-Offset` is where the next "
                "`offset` read starts, `X-Log-Truncated` says whether the cap cut the answer."
            ),
            "headers": _LOG_HEADERS,
        },
    },
)
def get_logs(
    job: VisibleJob,
    settings: SettingsDep,
    tail: Annotated[int | None, Query(ge=1, le=100_000, description="Last N lines.")] = None,
    offset: Annotated[
        int | None, Query(ge=0, le=2**62, description="Bytes from here on (to follow a log).")
    ] = None,
) -> PlainTextResponse:
    """The whole log, its last `tail` lines, or what follows `offset`: at most 1 MiB of the
    log per call. `X-Log-Truncated: true` says the cap cut the answer: the whole log or an
    `offset` read continues from `X-Log-Offset`; a `tail` answer then holds only the complete
    lines within the log's last 1 MiB (or the last 1 MiB of a longer line)."""
    from jobs.storage import storage_of

    # the shared folder, or the copy a worker publishes at each checkpoint and at the end
    storage = storage_of(settings)
    size = storage.size(job.id, "logs.txt") or 0
    if tail is not None and offset is None:
        (data, cut), end = _tail(storage, job.id, size, tail), size
    else:
        start = min(offset or 0, size)
        data = _read(storage, job.id, start, min(size, start + LOG_CHUNK_BYTES))
        end = start + len(data)
        cut = end < size
    return PlainTextResponse(
        data.decode("utf-8", errors="replace"),
        headers={"X-Log-Offset": str(end), "X-Log-Truncated": "true" if cut else "false"},
    )


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    summary="Cancel a job",
    responses={**_ERRORS, 409: {"model": Problem, "description": "Already final."}},
)
def cancel_job(job: VisibleJob, session: SessionDep) -> JobPublic:
    """A queued job ends at once; a running one is asked to stop and ends within seconds."""
    request_cancel(session, job)
    return _public(session, job)


@router.post(
    "/{job_id}/preempt",
    response_model=JobPublic,
    summary="Give a running job's worker back",
    responses={**_ERRORS, 409: {"model": Problem, "description": "Not running."}},
)
def preempt(job: VisibleJob, session: SessionDep, user: CurrentUser) -> JobPublic:
    """The job checkpoints at its next iteration and goes back to the queue, where it waits its
    turn and resumes from that checkpoint; the attempt does not count against its limit."""
    request_preemption(session, job, f"asked by {user.name}")
    return _public(session, job)


@router.post(
    "/{job_id}/retry",
    response_model=JobPublic,
    summary="Retry a failed or cancelled job",
    responses={**_ERRORS, 409: {"model": Problem, "description": "Not failed or cancelled."}},
)
def retry(job: VisibleJob, session: SessionDep, request: Request) -> JobPublic:
    """Queue it again; the worker resumes from its last checkpoint."""
    retry_job(session, job)
    _dispatch(request, session, job)
    return _public(session, job)


@router.delete(
    "/{job_id}",
    response_model=Deleted,
    summary="Delete an ended job and its files",
    responses={
        **_ERRORS,
        409: {"model": Problem, "description": "Not ended, or its student feeds a live job."},
    },
)
def delete_job(job: VisibleJob, session: SessionDep, settings: SettingsDep) -> Deleted:
    """Remove the job, its artifacts, metrics and events. A job that may still run must be
    cancelled first; one whose student another job not yet ended will load is refused."""
    from jobs.artifacts import store_of
    from jobs.retention import delete_job as remove

    assert settings.artifacts_dir is not None
    job_id = job.id
    freed = remove(session, store_of(settings), job)
    return Deleted(id=job_id, freed_bytes=freed)


@router.get(
    "/{job_id}/images/{image_id}",
    response_class=FileResponse,
    summary="An image of the job's validation split",
    responses={**_ERRORS, 200: {"content": {"image/*": {}}, "description": "The image file."}},
)
def job_image(job: VisibleJob, image_id: int) -> FileResponse:
    """For drawing `run/predictions.json` (the student's detections and the true boxes of the
    first validation images) over the images themselves."""
    from api.routes.datasets import image_response

    val = ((job.resolved_spec or {}).get("data") or {}).get("val")
    if not val:
        raise NotFound(f"job {job.id} has no validation split")
    return image_response(val, image_id, "val")
