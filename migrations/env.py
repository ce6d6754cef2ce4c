"""Alembic environment: run by `jobs.migrate` (and by `alembic` itself if pointed here).

The database URL comes from `config.attributes["url"]`, set in code by `jobs.migrate` (or from
`sqlalchemy.url` of an ini file), so the same scripts migrate the embedded SQLite file and a
team's PostgreSQL. Autogenerate on SQLite renders batch operations: SQLite rebuilds a table for
changes it cannot ALTER in place.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, Engine, create_engine, event, pool

from jobs.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError(
            "no database URL: run migrations through `hmkd db upgrade` (jobs.migrate.upgrade)"
        )
    return str(url)


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _configure(**kwargs: object) -> None:
    sqlite = _is_sqlite(_url())
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=sqlite,
        compare_type=True,
        # SQLite's DDL is transactional too once pysqlite stops committing around it (below):
        # an upgrade applies entirely or not at all, and costs one fsync instead of one per table.
        transactional_ddl=True,
        **kwargs,  # type: ignore[arg-type]
    )


def _engine(url: str) -> Engine:
    engine = create_engine(url, poolclass=pool.NullPool)
    if _is_sqlite(url):

        @event.listens_for(engine, "connect")
        def _no_driver_transactions(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # pysqlite would commit before every DDL

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def run_offline() -> None:
    """Emit SQL instead of running it (`alembic upgrade --sql`)."""
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = _engine(_url())
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
