"""Database and broker fixtures for the service tests (a pytest plugin, see tests/conftest.py).

Every test that takes `db_url` runs on a SQLite file and, when HMKD_TEST_DATABASE_URL is set, on
a fresh PostgreSQL database created for it on that server; `broker_url` likewise runs on kombu's
SQLite transport and on Redis when HMKD_TEST_BROKER_URL is set. A test taking both (directly or
through `service_settings`) runs twice, not four times: embedded (SQLite + SQLite broker) and
team (PostgreSQL + Redis), the two deployments that exist. With a variable set, an unreachable
server makes the test fail (error), never skip: CI must not go green on nothing. Databases are
migrated with the real Alembic history, never `create_all`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from jobs.models import User
    from jobs.settings import Settings

DATABASE_ENV = "HMKD_TEST_DATABASE_URL"
BROKER_ENV = "HMKD_TEST_BROKER_URL"

DB_PARAMS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres, id="postgres")]
BROKER_PARAMS = ["sqlite", pytest.param("redis", marks=pytest.mark.redis, id="redis")]
PAIRED_PARAMS = [
    pytest.param("sqlite", "sqlite", id="sqlite"),
    pytest.param(
        "postgres", "redis", marks=[pytest.mark.postgres, pytest.mark.redis], id="postgres-redis"
    ),
]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize the backend fixtures; database and broker together when a test uses both."""
    names = metafunc.fixturenames
    if "empty_db_url" in names:
        metafunc.parametrize("empty_db_url", DB_PARAMS, indirect=True)
    if "db_url" in names and "broker_url" in names:
        metafunc.parametrize(("db_url", "broker_url"), PAIRED_PARAMS, indirect=True)
    elif "db_url" in names:
        metafunc.parametrize("db_url", DB_PARAMS, indirect=True)
    elif "broker_url" in names:
        metafunc.parametrize("broker_url", BROKER_PARAMS, indirect=True)


def _param(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "sqlite")  # "sqlite" when requested dynamically


def _server_url(env: str) -> str:
    url = os.environ.get(env)
    if not url:
        pytest.skip(f"{env} is not set")
    return url


def _postgres_database(server_url: str) -> AbstractContextManager[str]:
    """A new, empty database on the server of `server_url`, dropped afterwards."""
    from bench.chaos import scratch_database

    return scratch_database(server_url, prefix="hmkd_test")


@contextmanager
def _empty_database(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "postgres":
        with _postgres_database(_server_url(DATABASE_ENV)) as url:
            yield url
        return
    from jobs.db import dispose_engines

    try:
        yield f"sqlite:///{tmp_path / 'hmkd.db'}"
    finally:
        dispose_engines()


@pytest.fixture
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no tables at all (for migration tests)."""
    with _empty_database(_param(request), tmp_path) as url:
        yield url


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database migrated to head, for this test only."""
    from jobs.migrate import upgrade

    with _empty_database(_param(request), tmp_path) as url:
        upgrade(url)
        yield url


@pytest.fixture
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty broker: a kombu SQLite file, or the Redis database of HMKD_TEST_BROKER_URL
    flushed before and after the test."""
    if _param(request) == "sqlite":
        yield f"sqla+sqlite:///{tmp_path / 'broker.db'}"
        return
    import redis

    url = _server_url(BROKER_ENV)
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
        yield url
        client.flushdb()
    finally:
        client.close()


@pytest.fixture
def service_settings(db_url: str, broker_url: str, tmp_path: Path) -> Settings:
    """Settings for one test: its own data folder, database and broker, and short timings
    (6 s lease, 1 s heartbeat and sweep, unthrottled progress) so lease tests run in seconds."""
    from jobs.settings import Settings

    datasets = tmp_path / "datasets"
    datasets.mkdir(exist_ok=True)
    return Settings(
        data_dir=tmp_path,
        database_url=db_url,
        broker_url=broker_url,
        artifacts_dir=tmp_path / "artifacts",
        dataset_roots=[datasets],
        lease_seconds=6.0,
        heartbeat_seconds=1.0,
        sweep_seconds=1.0,
        progress_interval_seconds=0.0,
        node_address="127.0.0.1",  # multi-node jobs' "machines" are workers on this host
        rendezvous_port=0,
        rendezvous_timeout_s=60.0,
    )


def _user_with_token(
    settings: Settings, name: str, team: str, *, is_admin: bool
) -> tuple[User, str]:
    from jobs.auth import create_token, create_user
    from jobs.db import session_scope

    with session_scope(settings.database_url) as session:
        user = create_user(session, name=name, team_name=team, is_admin=is_admin)
        token, _ = create_token(session, user, name="tests")
        _ = user.team.name  # loaded now: the user is used after its session closes
    return user, token


@pytest.fixture
def admin(service_settings: Settings) -> tuple[User, str]:
    """(User, plain token) of `alice`, an admin of team `alpha`."""
    return _user_with_token(service_settings, "alice", "alpha", is_admin=True)


@pytest.fixture
def other_team_user(service_settings: Settings) -> tuple[User, str]:
    """(User, plain token) of `bob` in team `beta`: must never see alpha's jobs."""
    return _user_with_token(service_settings, "bob", "beta", is_admin=False)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3 API (moto's server mode) on a free local port, for the object-storage tests: a
    real HTTP server that boto3 talks to as it would to MinIO or AWS, in-process only in that
    it runs on a thread. Credentials are moto's dummies, set for workers started too."""
    pytest.importorskip("boto3", reason="the s3 extra is not installed")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_url(s3_endpoint: str) -> str:
    """s3://<a new bucket>/<prefix> on the test server, one bucket per test."""
    import uuid

    import boto3

    bucket = f"hmkd-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    return f"s3://{bucket}/artifacts"


@pytest.fixture
def s3_settings(service_settings: Settings, s3_url: str, s3_endpoint: str) -> Settings:
    """`service_settings` with artifacts in the test bucket."""
    return service_settings.model_copy(
        update={"storage_url": s3_url, "s3_endpoint_url": s3_endpoint, "s3_region": "us-east-1"}
    )
