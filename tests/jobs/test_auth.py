"""Tokens are stored hashed, revocable, and checked against the real database."""

from __future__ import annotations

import stat
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, pool, select, text

from jobs import auth
from jobs.auth import (
    LEGACY_PREFIX_CHARS,
    SHOWN_PREFIX_CHARS,
    AlreadyExists,
    UnknownToken,
    authenticate,
    create_team,
    create_token,
    create_user,
    ensure_local_admin,
    generate_token,
    hash_token,
    revoke_tokens,
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
    assert token[:SHOWN_PREFIX_CHARS] in rows[0]  # the prefix that identifies it in listings


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


# Revoking by prefix. Tokens made before 0007 stored 8 characters (`hmkd_` and 3 random ones):
# 759 tokens were enough for two to share one. These tests make such tokens with chosen values
# through `create_token` itself, its generator and prefix length monkeypatched.


def _chosen_token(
    url: str, user_id: int, token: str, monkeypatch: pytest.MonkeyPatch, *, legacy: bool = False
) -> str:
    """`token`, created as `create_token` creates one (an old 8-character prefix if `legacy`)."""
    with monkeypatch.context() as m:
        m.setattr(auth, "generate_token", lambda: token)
        if legacy:
            m.setattr(auth, "SHOWN_PREFIX_CHARS", LEGACY_PREFIX_CHARS)
        with session_scope(url) as s:
            made, row = create_token(s, s.get(User, user_id))
            assert made == token and len(row.prefix) == (8 if legacy else SHOWN_PREFIX_CHARS)
    return token


def _revoke(url: str, text: str) -> list[str]:
    with session_scope(url) as s:
        return [row.prefix for row in revoke_tokens(s, prefix=text)]


def _live(url: str, token: str) -> bool:
    with session_scope(url) as s:
        return authenticate(s, token) is not None


def _tail43(seed: str) -> str:
    """43 URL-safe characters, as `generate_token` draws after `hmkd_`."""
    return (seed * 43)[:43]


def test_new_tokens_show_a_long_prefix_that_revokes_exactly_its_token(db_url: str) -> None:
    user_id = _user(db_url)
    tokens = [_token(db_url, user_id) for _ in range(3)]
    with session_scope(db_url) as s:
        prefixes = [row.prefix for row in auth.list_tokens(s)]
    assert prefixes == [t[:SHOWN_PREFIX_CHARS] for t in tokens]
    assert len("hmkd_") + 8 <= SHOWN_PREFIX_CHARS  # >= 48 random bits: no collision in practice
    assert all(len(t) - SHOWN_PREFIX_CHARS >= 30 for t in tokens)  # never near a usable token
    assert _revoke(db_url, prefixes[1]) == [prefixes[1]]  # the shown prefix, exactly
    assert [_live(db_url, t) for t in tokens] == [True, False, True]


def test_a_shared_old_prefix_is_refused_and_the_whole_token_revokes_one(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_id = _user(db_url)
    first, second = (
        _chosen_token(db_url, user_id, "hmkd_P_h" + _tail43(seed)[3:], monkeypatch, legacy=True)
        for seed in ("a1", "b2")
    )
    assert first[:8] == second[:8] == "hmkd_P_h" and first != second
    with pytest.raises(UnknownToken, match=r"more than one live token.*give the whole token"):
        _revoke(db_url, "hmkd_P_h")
    with pytest.raises(UnknownToken, match="no live token"):  # 20 real characters: not cut to 8
        _revoke(db_url, first[:20])
    assert _live(db_url, first) and _live(db_url, second)  # nothing was revoked
    assert _revoke(db_url, first) == ["hmkd_P_h"]  # the whole token: exactly that one
    assert not _live(db_url, first) and _live(db_url, second)
    with pytest.raises(UnknownToken, match="is revoked"):
        _revoke(db_url, first)
    assert _revoke(db_url, "hmkd_P_h") == ["hmkd_P_h"]  # the one left live: no longer shared
    assert not _live(db_url, second)


def test_an_old_eight_character_prefix_still_revokes_its_token(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_id = _user(db_url)
    old = _chosen_token(db_url, user_id, "hmkd_DHP" + _tail43("x9")[3:], monkeypatch, legacy=True)
    # a new token whose longer prefix starts with the old one's 8 characters
    new = _chosen_token(db_url, user_id, "hmkd_DHP" + _tail43("y8")[3:], monkeypatch)
    assert _revoke(db_url, new[:SHOWN_PREFIX_CHARS]) == [new[:SHOWN_PREFIX_CHARS]]
    assert _live(db_url, old) and not _live(db_url, new)
    assert _revoke(db_url, "hmkd_DHP") == ["hmkd_DHP"]
    assert not _live(db_url, old)


def test_text_that_is_not_the_token_revokes_nothing(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_id = _user(db_url)
    old = _chosen_token(db_url, user_id, "hmkd_DHP" + _tail43("q7")[3:], monkeypatch, legacy=True)
    new = _token(db_url, user_id)
    shown = new[:SHOWN_PREFIX_CHARS]
    wrong = [
        "hmkd_DHPWRONGWRONG",  # starts with the old token's prefix, then is not its token
        old[:-1],
        old + "x",
        shown + "x",  # longer than the shown prefix, not the token
        new[:-1],
        new + "x",
        shown[:-1],  # shorter than the shown prefix
        "hmkd_",
        "",
    ]
    if new[:8] != old[:8]:  # (1 chance in 64**3 that the random token starts like `old`)
        wrong.append(new[:8])
    for given in wrong:
        with pytest.raises(UnknownToken, match="no live token") as err:
            _revoke(db_url, given)
        assert new not in str(err.value) and new[:20] not in str(err.value)  # never echoed whole
    assert _live(db_url, old) and _live(db_url, new)
    assert _revoke(db_url, new) == [shown]
    assert _revoke(db_url, old[:8]) == ["hmkd_DHP"]


def test_a_shared_new_prefix_is_refused_too(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Astronomically unlikely with 12 random characters, but handled as the old collisions."""
    user_id = _user(db_url)
    a = _chosen_token(db_url, user_id, "hmkd_" + "S" * 12 + _tail43("c3")[12:], monkeypatch)
    b = _chosen_token(db_url, user_id, "hmkd_" + "S" * 12 + _tail43("d4")[12:], monkeypatch)
    with pytest.raises(UnknownToken, match="more than one"):
        _revoke(db_url, a[:SHOWN_PREFIX_CHARS])
    assert _revoke(db_url, b) == [b[:SHOWN_PREFIX_CHARS]]
    assert _live(db_url, a) and not _live(db_url, b)


def test_revoking_a_users_tokens_by_whole_token_is_limited_to_that_user(db_url: str) -> None:
    carol, dave = _user(db_url, "carol"), _user(db_url, "dave")
    dave_token = _token(db_url, dave)
    _token(db_url, carol)
    with session_scope(db_url) as s, pytest.raises(UnknownToken, match="carol"):
        revoke_tokens(s, prefix=dave_token, user=s.get(User, carol))
    assert _live(db_url, dave_token)
