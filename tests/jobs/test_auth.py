"""Tokens are stored hashed, revocable, and checked against the real database."""

from __future__ import annotations

import stat
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, pool, select, text

from jobs.auth import (
    AlreadyExists,
    authenticate,
    create_team,
    create_token,
    create_user,
    ensure_local_admin,
    generate_token,
    hash_token,
)
from jobs.db import session_scope
from jobs.lifecycle import Conflict
from jobs.models import ApiToken, User, utcnow
from jobs.settings import Settings


def _user(url: str, name: str = "carol", team: str = "alpha") -> int:
    with session_scope(url) as s:
        return create_user(s, name=name, team_name=team).id


def _token(url: str, user_id: int) -> str:
    with session_scope(url) as s:
        token, _ = create_token(s, s.get(User, user_id), name="laptop")
        return token


def test_tokens_are_random_prefixed_and_hashed() -> None:
    a, b = generate_token(), generate_token()
    assert a != b and a.startswith("hmkd_") and len(a) > 40
    assert hash_token(a) == hash_token(a) and len(hash_token(a)) == 64


def test_the_plain_token_is_nowhere_in_the_database(db_url: str) -> None:
    token = _token(db_url, _user(db_url))
    engine = create_engine(db_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT * FROM api_tokens")).all()
    finally:
        engine.dispose()
    assert len(rows) == 1
    assert all(token not in str(value) for value in rows[0])
    assert hash_token(token) in rows[0]
    assert token[:8] in rows[0]  # the short prefix that identifies it in listings


def test_authenticate_known_unknown_and_revoked(db_url: str) -> None:
    user_id = _user(db_url)
    token = _token(db_url, user_id)
    with session_scope(db_url) as s:
        user = authenticate(s, token)
        assert user is not None and user.id == user_id and user.team.name == "alpha"
        assert authenticate(s, token + "x") is None
        assert authenticate(s, "") is None
        assert authenticate(s, "hmkd_" + "a" * 10_000) is None
    with session_scope(db_url) as s:
        s.scalar(select(ApiToken)).revoked = True
    with session_scope(db_url) as s:
        assert authenticate(s, token) is None


def test_last_used_is_written_at_most_once_a_minute(db_url: str) -> None:
    token = _token(db_url, _user(db_url))
    start = utcnow()
    with session_scope(db_url) as s:
        authenticate(s, token, now=start)
    with session_scope(db_url) as s:
        authenticate(s, token, now=start + timedelta(seconds=30))
    with session_scope(db_url) as s:
        first = s.scalar(select(ApiToken.last_used_at))
        assert abs((first.replace(tzinfo=start.tzinfo) - start).total_seconds()) < 1e-3
        authenticate(s, token, now=start + timedelta(seconds=61))
    with session_scope(db_url) as s:
        later = s.scalar(select(ApiToken.last_used_at)).replace(tzinfo=start.tzinfo)
        assert later - start >= timedelta(seconds=61)


def test_users_are_unique_and_teams_shared(db_url: str) -> None:
    _user(db_url, "dave", "alpha")
    with session_scope(db_url) as s:
        erin = create_user(s, name="erin", team_name="alpha", is_admin=True)
        assert erin.team_id == create_team(s, "alpha").id and erin.is_admin
    with pytest.raises(AlreadyExists, match="already exists") as err, session_scope(db_url) as s:
        create_user(s, name="dave", team_name="beta")
    assert isinstance(err.value, Conflict)  # the API answers 409 for it


def _settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=db_url)


def test_local_admin_token_is_kept_private_and_reused(db_url: str, tmp_path: Path) -> None:
    settings = _settings(db_url, tmp_path)
    token = ensure_local_admin(settings)
    path = tmp_path / "data" / "token"
    assert path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_local_admin(settings) == token
    with session_scope(db_url) as s:
        user = authenticate(s, token)
        assert user is not None and user.name == "admin" and user.is_admin
        assert user.team.name == "local"
        assert len(s.scalars(select(ApiToken)).all()) == 1


def test_local_admin_replaces_a_token_that_no_longer_works(db_url: str, tmp_path: Path) -> None:
    settings = _settings(db_url, tmp_path)
    path = tmp_path / "data" / "token"
    first = ensure_local_admin(settings)
    with session_scope(db_url) as s:
        s.scalar(select(ApiToken)).revoked = True
    second = ensure_local_admin(settings)
    assert second != first and path.read_text().strip() == second
    path.write_text("hmkd_not-a-token\n")
    path.chmod(0o644)
    third = ensure_local_admin(settings)
    assert third not in (first, second) and stat.S_IMODE(path.stat().st_mode) == 0o600
    with session_scope(db_url) as s:
        assert authenticate(s, third) is not None
        assert s.scalar(select(User).where(User.name == "admin")) is not None
