"""jobs.broker against the real brokers: configuration, publishing, the outbox."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

from jobs.broker import (
    PUBLISH_ERRORS,
    RUN_JOB_TASK,
    broker_priority,
    dispatch_job,
    dispatch_pending,
    make_celery,
    publish,
)
from jobs.db import session_scope
from jobs.models import Job, JobEvent
from jobs.settings import Settings

DOWN = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connection refused


def _receive(app: Celery, queue: str, timeout: float = 5.0) -> Any:
    """The next message on `queue`, read back from the broker with plain kombu."""
    with app.connection_for_read() as conn, conn.SimpleQueue(queue) as q:
        message = q.get(block=True, timeout=timeout)
        message.ack()
        return message


def _job(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_config_for_long_gpu_tasks(service_settings: Settings) -> None:
    app = make_celery(service_settings)
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result and not conf.task_track_started
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_default_queue == service_settings.default_queue
    assert conf.broker_connection_retry_on_startup
    options = conf.broker_transport_options
    if service_settings.broker_url.startswith("redis"):
        timeout = service_settings.visibility_timeout_seconds
        assert options["visibility_timeout"] == timeout
        assert conf.result_backend_transport_options["visibility_timeout"] == timeout
    else:  # kombu's SQLAlchemy transport hands these to create_engine(): nothing else allowed
        assert set(options) <= {"connect_args"}


def test_broker_priority_runs_higher_first_everywhere() -> None:
    assert broker_priority("redis://h/0", 9) == 0 and broker_priority("redis://h/0", 0) == 9
    assert broker_priority("amqp://h//", 7) == 7
    assert broker_priority("sqla+sqlite:///x.db", 5) is None


def test_publish_sends_the_job_id_by_task_name(
    service_settings: Settings, submit: Callable[..., str]
) -> None:
    job_id = submit()
    app = make_celery(service_settings)
    publish(app, _job(service_settings, job_id))
    message = _receive(app, service_settings.default_queue)
    assert message.headers["task"] == RUN_JOB_TASK
    args, kwargs, _ = message.payload
    assert args == [job_id] and kwargs == {}
    app.close()


def test_redis_serves_higher_priority_first(
    service_settings: Settings, submit: Callable[..., str]
) -> None:
    if not service_settings.broker_url.startswith("redis"):
        pytest.skip("kombu's SQLAlchemy transport has no priorities: first in, first out")
    low = submit("low", resources={"priority": 1})
    high = submit("high", resources={"priority": 8})
    app = make_celery(service_settings)
    publish(app, _job(service_settings, low))
    publish(app, _job(service_settings, high))
    first = _receive(app, service_settings.default_queue)
    assert first.payload[0] == [high]
    app.close()


def test_publish_to_a_dead_broker_fails_fast(
    service_settings: Settings, submit: Callable[..., str]
) -> None:
    job_id = submit()
    app = make_celery(service_settings.model_copy(update={"broker_url": DOWN}))
    started = time.monotonic()
    with pytest.raises(PUBLISH_ERRORS):
        publish(app, _job(service_settings, job_id))
    assert time.monotonic() - started < 5, "publishing must not hang an API request"


def test_outbox_keeps_a_job_until_the_broker_is_back(
    service_settings: Settings, submit: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    job_id = submit()
    down = service_settings.model_copy(update={"broker_url": DOWN})
    with caplog.at_level(logging.WARNING, logger="jobs.broker"):
        assert dispatch_pending(down) == 0  # logged, never raised
    assert "stays pending" in caplog.text
    assert not _job(service_settings, job_id).dispatched

    app = make_celery(service_settings)
    assert dispatch_pending(service_settings, app) == 1
    assert _job(service_settings, job_id).dispatched
    assert dispatch_pending(service_settings, app) == 0  # nothing left to publish
    assert _receive(app, service_settings.default_queue).payload[0] == [job_id]
    with session_scope(service_settings.database_url) as session:
        kinds = [e.kind for e in session.query(JobEvent).filter_by(job_id=job_id)]
    assert kinds.count("dispatched") == 1
    app.close()


def test_dispatch_job_publishes_one_submitted_job_once(
    service_settings: Settings, submit: Callable[..., str]
) -> None:
    job_id, other = submit("mine"), submit("other")
    down = service_settings.model_copy(update={"broker_url": DOWN})
    assert not dispatch_job(down, job_id)  # what the API does after submit: never raises
    app = make_celery(service_settings)
    assert dispatch_job(service_settings, job_id, app)
    assert not dispatch_job(service_settings, job_id, app)  # already out: not sent again
    assert (
        _job(service_settings, job_id).dispatched and not _job(service_settings, other).dispatched
    )
    assert _receive(app, service_settings.default_queue).payload[0] == [job_id]
    app.close()


def test_messages_of_jobs_that_no_longer_wait_are_dropped(
    service_settings: Settings, submit: Callable[..., str]
) -> None:
    """Cancelled jobs, a queue no worker serves, a job the database does not know: their
    messages go; the one job still queued keeps its message."""
    from jobs.lifecycle import request_cancel
    from jobs.stale_messages import drop_stale_messages, waiting_messages

    app = make_celery(service_settings)
    waiting = submit("waits")
    cancelled = submit("cancelled")
    orphan = submit("nobody serves", resources={"queue": "nobody", "priority": 7})
    dispatch_pending(service_settings, app)
    with session_scope(service_settings.database_url) as session:
        for job_id in (cancelled, orphan):
            request_cancel(session, session.get(Job, job_id))
    app.send_task(RUN_JOB_TASK, args=["f" * 32], queue=service_settings.default_queue)
    before = waiting_messages(service_settings)
    assert sorted(before) == sorted([waiting, cancelled, orphan, "f" * 32])
    assert drop_stale_messages(service_settings) == 3
    assert waiting_messages(service_settings) == [waiting]
    assert drop_stale_messages(service_settings) == 0
    assert _receive(app, service_settings.default_queue).payload  # still deliverable
    app.close()
