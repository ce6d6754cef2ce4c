"""Drop broker messages whose job no longer waits: cancelled, finished, deleted, or unknown.

A worker acknowledges and ignores such a message when it gets to it (the claim refuses the
job), but a queue no worker serves never gets to it, and a cancel/retry storm piles up one
message per publish. The sweeper therefore looks through the waiting messages of every queue
the jobs name and removes those whose job is not `queued`. Messages a worker has taken (Redis'
`unacked` hash) are left alone: their worker is running or ignoring them.

Only waiting messages are read, straight from the broker's storage: Redis lists (one per
priority, as kombu names them) or the tables of kombu's SQLAlchemy transport.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import MetaData, Table, create_engine, delete, inspect, select
from sqlalchemy.pool import NullPool

from jobs.broker import RUN_JOB_TASK, is_redis
from jobs.db import session_scope
from jobs.models import Job, JobState
from jobs.settings import Settings

log = logging.getLogger(__name__)

_REDIS_PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: `<queue><sep><priority>`


def job_of(raw: bytes | str) -> str | None:
    """The job id a `hmkd.run_job` message carries; None for any other message."""
    try:
        envelope = json.loads(raw)
        if envelope.get("headers", {}).get("task") != RUN_JOB_TASK:
            return None
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def _waiting_elsewhere(settings: Settings, ids: Iterable[str]) -> set[str]:
    """Of `ids`, those whose job no longer waits in a queue (or does not exist)."""
    ids = set(ids)
    if not ids:
        return set()
    with session_scope(settings.database_url) as session:
        queued = set(
            session.scalars(
                select(Job.id).where(Job.id.in_(ids), Job.state == JobState.queued.value)
            )
        )
    return ids - queued


def _queues(settings: Settings) -> list[str]:
    with session_scope(settings.database_url) as session:
        named = set(session.scalars(select(Job.queue).distinct()))
    return sorted(named | {settings.default_queue})


def waiting_messages(settings: Settings) -> list[str]:
    """The job id of every waiting `hmkd.run_job` message, one entry per message."""
    return [job_id for _, job_id in _scan(settings, drop=None)]


def drop_stale_messages(settings: Settings) -> int:
    """Remove waiting messages for jobs that are not queued; returns how many."""
    found = _scan(settings, drop=lambda ids: _waiting_elsewhere(settings, ids))
    return sum(1 for dropped, _ in found if dropped)


def _scan(
    settings: Settings, drop: Callable[[set[str]], set[str]] | None
) -> list[tuple[bool, str]]:
    """(dropped, job id) of each waiting message; `drop` picks, from the ids seen, those whose
    messages are to be removed."""
    url = settings.broker_url
    if is_redis(url):
        return _scan_redis(settings, drop)
    if url.startswith("sqla+"):
        return _scan_sqlalchemy(settings, drop)
    return []  # another broker: its messages are ignored when delivered


def _scan_redis(
    settings: Settings, drop: Callable[[set[str]], set[str]] | None
) -> list[tuple[bool, str]]:
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2.0)
    try:
        lists = [
            key
            for queue in _queues(settings)
            for key in (queue, *(f"{queue}{_REDIS_PRIORITY_SEP}{p}" for p in range(1, 10)))
        ]
        found: list[tuple[str, bytes, str]] = []
        for key in lists:
            for raw in client.lrange(key, 0, -1):
                job_id = job_of(raw)
                if job_id is not None:
                    found.append((key, raw, job_id))
        stale = drop({job_id for _, _, job_id in found}) if drop else set()
        result = []
        for key, raw, job_id in found:
            removed = job_id in stale and client.lrem(key, 1, raw) == 1
            result.append((removed, job_id))
        return result
    finally:
        client.close()


def _scan_sqlalchemy(
    settings: Settings, drop: Callable[[set[str]], set[str]] | None
) -> list[tuple[bool, str]]:
    engine = create_engine(settings.broker_url.removeprefix("sqla+"), poolclass=NullPool)
    try:
        if not inspect(engine).has_table("kombu_message"):
            return []  # nothing published yet
        message = Table("kombu_message", MetaData(), autoload_with=engine)
        with engine.begin() as conn:
            rows: list[Any] = conn.execute(
                select(message.c.id, message.c.payload).where(message.c.visible.is_(True))
            ).all()
            found = [(row.id, job_id) for row in rows if (job_id := job_of(row.payload))]
            stale = drop({job_id for _, job_id in found}) if drop else set()
            ids = [mid for mid, job_id in found if job_id in stale]
            if ids:
                conn.execute(delete(message).where(message.c.id.in_(ids)))
        return [(job_id in stale, job_id) for _, job_id in found]
    finally:
        engine.dispose()
