"""The Celery side shared by the API and the workers: configuration and publishing.

Publishing is an outbox: a job row is committed first (`dispatched = False`), then its message
is sent, then the row is marked dispatched. A broker outage therefore delays a job and never
loses it: `dispatch_pending` (run by every worker's sweeper) publishes what is still pending.
A message may thus arrive twice; the worker's claim makes the second delivery a no-op.

Publishing must never hang an API request while the broker is down, so connection attempts
are short and bounded and errors are logged, not raised, by `dispatch_pending`.

This module configures Celery only; it imports no task code. Publishing goes by task name
(`send_task`), so the API never imports the worker.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy.exc import OperationalError as SQLAlchemyOperationalError

from jobs.db import session_scope
from jobs.lifecycle import mark_dispatched, pending_dispatch
from jobs.models import Job
from jobs.settings import Settings

log = logging.getLogger(__name__)

RUN_JOB_TASK = "hmkd.run_job"

# kombu's OperationalError covers refused or timed-out connections on every transport;
# SQLAlchemy's is what the embedded broker raises when its file is locked or unreadable; the
# others are what a broken socket raises on the way there.
PUBLISH_ERRORS: tuple[type[BaseException], ...] = (
    KombuOperationalError,
    SQLAlchemyOperationalError,
    ConnectionError,
    OSError,
    TimeoutError,
)

# One publish tries at most three times within about half a second, on top of the connect
# timeout below: a dead broker costs an API call ~2 s, not a hung request.
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
_CONNECT_TIMEOUT_S = 2.0


def is_redis(url: str) -> bool:
    return url.split("://", 1)[0] in ("redis", "rediss", "redis+socket", "sentinel")


def _transport_options(settings: Settings) -> dict[str, Any]:
    url = settings.broker_url
    if url.startswith("sqla+"):
        # kombu's SQLAlchemy transport hands its options to create_engine() (anything else is a
        # TypeError) and never redelivers: a fetched message is hidden for good, so a message
        # held by a worker that died is lost, and the sweeper's re-publish brings the job back.
        # SQLite's lock timeout must absorb the worker's polling next to API publishes.
        return {"connect_args": {"timeout": 10}} if url.startswith("sqla+sqlite") else {}
    options: dict[str, Any] = {
        # Redis (and SQS) re-deliver an unacked message after this many seconds. A multi-hour
        # task holds its message unacked (late acks) the whole time, so this is long; a
        # redelivery while the job still runs is harmless anyway: the claim refuses a job whose
        # lease is live, and a lost message is re-published by the sweeper, not by this timeout.
        "visibility_timeout": settings.visibility_timeout_seconds,
    }
    if is_redis(url):
        options.update(
            {
                # A connect that hangs (blackholed host) must not hang an API request.
                "socket_connect_timeout": _CONNECT_TIMEOUT_S,
                # One Redis list per priority so `resources.priority` orders a queue; kombu's
                # Redis serves lower numbers first, `publish` inverts ours (higher runs first).
                "priority_steps": list(range(10)),
                "queue_order_strategy": "priority",
            }
        )
    return options


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured for multi-hour GPU tasks, one at a time per worker."""
    app = Celery("hmkd", broker=settings.broker_url, set_as_current=False)
    transport_options = _transport_options(settings)
    app.conf.update(
        # Ack only when the task returned: a worker that dies mid-run leaves its message to be
        # delivered again instead of silently dropping the job...
        task_acks_late=True,
        # ...including when the pool process running the task is killed (OOM killer, SIGKILL):
        # without this Celery acks the message of a task whose process vanished.
        task_reject_on_worker_lost=True,
        # Reserve one message at a time: a worker busy for hours must not hoard queued jobs
        # that an idle worker could run.
        worker_prefetch_multiplier=1,
        task_track_started=False,
        # State lives in the database; a result backend would only duplicate it. Should one
        # ever be configured on Redis, `result_backend_transport_options` must carry the same
        # visibility timeout, or its redelivery timing would disagree with the broker's.
        task_ignore_result=True,
        result_backend=None,
        result_backend_transport_options={
            "visibility_timeout": settings.visibility_timeout_seconds
        },  # not used while there is no backend; kept consistent for when there is one
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        # A worker outlives a broker outage: it reconnects for as long as it takes.
        broker_connection_max_retries=None,
        broker_connection_timeout=_CONNECT_TIMEOUT_S,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.default_queue,
        task_create_missing_queues=True,
        # The worker's own log setup stays; the training child logs to the job's logs.txt.
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        enable_utc=True,
    )
    return app


def broker_priority(broker_url: str, priority: int) -> int | None:
    """The message priority for a job's `resources.priority` (0..9, higher runs first).

    Redis serves lower numbers first, so the scale is inverted there; the SQLAlchemy
    transport has no priorities (a queue is first in, first out) and gets none.
    """
    if is_redis(broker_url):
        return 9 - max(0, min(9, priority))
    if broker_url.startswith(("amqp", "pyamqp")):
        return max(0, min(9, priority))
    return None


def publish(celery: Celery, job: Job) -> None:
    """Send the job's message to its queue; raises a kombu/OS error when the broker is down."""
    options: dict[str, Any] = {
        "queue": job.queue,
        "retry": True,
        "retry_policy": _PUBLISH_RETRY,
    }
    priority = broker_priority(str(celery.conf.broker_url or ""), job.priority)
    if priority is not None:
        options["priority"] = priority
    celery.send_task(RUN_JOB_TASK, args=[job.id], **options)


def dispatch_job(settings: Settings, job_id: str, celery: Celery | None = None) -> bool:
    """Publish one just-submitted job and mark it dispatched; False (logged) if the broker is
    down, in which case the sweeper publishes it later. What the API calls after a submit."""
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        if job is None or job.dispatched or job.state != "queued":
            return False
    app = celery if celery is not None else make_celery(settings)
    try:
        publish(app, job)
    except PUBLISH_ERRORS as err:
        _log_failure(job, err)
        return False
    finally:
        if celery is None:
            app.close()
    with session_scope(settings.database_url) as session:
        mark_dispatched(session, job_id)
    return True


def dispatch_pending(settings: Settings, celery: Celery | None = None, limit: int = 100) -> int:
    """Publish queued, undispatched jobs (the outbox), and again those whose message has gone
    unclaimed for `settings.redispatch_seconds`; returns how many were published.

    A publish failure is logged and leaves the job pending for the next sweep; it is never
    raised, so an API call that submitted a job succeeds even while the broker is down.
    Long-lived callers (the API, the sweeper) pass their one `celery` app: making one per call
    costs a broker connection each time.
    """
    owned = celery is None
    app = celery if celery is not None else make_celery(settings)
    published = 0
    try:
        with session_scope(settings.database_url) as session:
            pending = pending_dispatch(
                session, limit=limit, redispatch_seconds=settings.redispatch_seconds
            )
        for job in pending:
            job_id = job.id
            try:
                publish(app, job)
            except PUBLISH_ERRORS as err:
                _log_failure(job, err)
                break  # the broker is down: the others would fail the same way
            with session_scope(settings.database_url) as session:
                mark_dispatched(session, job_id)
            published += 1
    finally:
        if owned:
            app.close()
    return published


def _log_failure(job: Job, err: BaseException) -> None:
    log.warning(
        "could not publish job %s to queue %s (%s); it stays pending and is re-published "
        "by the next sweep",
        job.id,
        job.queue,
        err,
    )
