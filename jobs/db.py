"""Engines and sessions. SQLite is shared by the API, the worker and its heartbeat, so it runs
in WAL mode with a busy timeout; transactions stay short."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}


def _create(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    path = url.split("///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


def get_engine(url: str) -> Engine:
    with _lock:
        if url not in _engines:
            _engines[url] = _create(url)
            _factories[url] = sessionmaker(_engines[url], expire_on_commit=False)
        return _engines[url]


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    get_engine(url)
    session = _factories[url]()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _reset_after_fork() -> None:
    """A forked child gets a fresh lock (the parent's may have been held mid-fork) and no
    engines: pooled sockets belong to the parent."""
    global _lock
    _lock = threading.Lock()
    _engines.clear()
    _factories.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def dispose_engines() -> None:
    """Drop pooled connections: a forked child must never reuse its parent's sockets."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)
        _engines.clear()
        _factories.clear()


def db_clock(session: Session) -> datetime:
    """The database server's time, in UTC: the one clock every worker and API process shares.

    Leases are written and compared with it, so a host whose clock runs ahead can neither keep
    a lease it lost nor take one still held. SQLite runs inside this very process, on this
    host, and has no clock of its own to ask.
    """
    if session.get_bind().dialect.name == "sqlite":
        return datetime.now(UTC)
    now = session.scalar(text("SELECT clock_timestamp()"))
    assert isinstance(now, datetime)
    return now.astimezone(UTC) if now.tzinfo is not None else now.replace(tzinfo=UTC)
