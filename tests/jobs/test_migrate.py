"""The Alembic history builds exactly the models' schema, on SQLite and on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, pool, text

from jobs.migrate import (
    DatabaseNotMigrated,
    check_current,
    current_revision,
    display_url,
    head_revision,
    upgrade,
)
from jobs.models import Base


def _tables(url: str) -> set[str]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_from_empty_reaches_head_and_is_idempotent(empty_db_url: str) -> None:
    assert current_revision(empty_db_url) is None
    upgrade(empty_db_url)
    assert current_revision(empty_db_url) == head_revision()
    check_current(empty_db_url)
    upgrade(empty_db_url)  # already there: nothing to do, no error
    assert _tables(empty_db_url) == set(Base.metadata.tables) | {"alembic_version"}


def test_downgrade_to_base_and_up_again(empty_db_url: str) -> None:
    from alembic import command

    from jobs.migrate import _config

    upgrade(empty_db_url)
    command.downgrade(_config(empty_db_url), "base")
    assert _tables(empty_db_url) <= {"alembic_version"}
    assert current_revision(empty_db_url) is None
    upgrade(empty_db_url)
    assert current_revision(empty_db_url) == head_revision()


def test_schema_matches_models(db_url: str) -> None:
    """Autogenerate finds nothing to do: models and history agree (types and nullability too)."""
    engine = create_engine(db_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diffs = compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()
    assert diffs == []


def test_check_current_refuses_an_empty_database(empty_db_url: str) -> None:
    with pytest.raises(DatabaseNotMigrated) as err:
        check_current(empty_db_url)
    message = str(err.value)
    assert "is not migrated (at empty, code needs " in message
    assert "run `hmkd db upgrade`" in message
    assert err.value.current is None and err.value.head == head_revision()


def test_asking_does_not_create_a_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nothing' / 'hmkd.db'}"
    assert current_revision(url) is None
    with pytest.raises(DatabaseNotMigrated):
        check_current(url)
    assert not (tmp_path / "nothing").exists()


def test_a_newer_database_says_to_install_the_newer_code(db_url: str) -> None:
    engine = create_engine(db_url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    finally:
        engine.dispose()
    with pytest.raises(DatabaseNotMigrated, match="migrated by a newer hmkd") as err:
        check_current(db_url)
    assert err.value.current == "ffff"


def test_messages_hide_the_password() -> None:
    shown = display_url("postgresql+psycopg://hmkd:s3cret%25@db.example:5432/hmkd")
    assert "s3cret" not in shown
    assert shown == "postgresql+psycopg://hmkd:***@db.example:5432/hmkd"
