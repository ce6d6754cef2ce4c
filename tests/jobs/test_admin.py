"""The admin commands' backend: `hmkd db upgrade`, `users create`, `tokens create`."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import admin
from jobs.auth import AlreadyExists, UnknownUser, authenticate
from jobs.db import session_scope
from jobs.migrate import DatabaseNotMigrated, head_revision
from jobs.settings import Settings


def test_db_upgrade_then_up_to_date(empty_db_url: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=empty_db_url)
    first = admin.db_upgrade(settings)
    assert (first.before, first.after) == (None, head_revision())
    assert "upgraded from empty to" in str(first)
    assert "is up to date" in str(admin.db_upgrade(settings))


def test_users_and_tokens(db_url: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=db_url)
    issued = admin.create_user(settings, "frank", team="gamma", is_admin=True)
    assert (issued.user, issued.team, issued.is_admin) == ("frank", "gamma", True)
    again = admin.create_token(settings, "frank", name="ci")
    assert again.token != issued.token
    with session_scope(db_url) as s:
        for token in (issued.token, again.token):
            user = authenticate(s, token)
            assert user is not None and user.name == "frank"
    with pytest.raises(AlreadyExists):
        admin.create_user(settings, "frank", team="gamma")
    with pytest.raises(UnknownUser, match="hmkd users create nobody"):
        admin.create_token(settings, "nobody")


def test_commands_refuse_an_unmigrated_database(empty_db_url: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=empty_db_url)
    with pytest.raises(DatabaseNotMigrated, match="hmkd db upgrade"):
        admin.create_user(settings, "gina", team="alpha")
