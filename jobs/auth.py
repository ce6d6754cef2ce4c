"""Teams, users and API tokens.

A token is shown once, at creation; the database keeps only its sha256 and its first characters
(to recognise it in listings and to revoke it by). A stolen database therefore yields no usable
token, and a lookup by hash compares secrets in constant time: the attacker-controlled token
never meets a stored secret byte by byte.

Tokens made before the shown prefix grew to `SHOWN_PREFIX_CHARS` keep the
`LEGACY_PREFIX_CHARS` they were stored with (`hmkd_` and 3 random characters, which two tokens
of a few hundred may share); a shared one is revoked by giving the whole token.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from jobs.lifecycle import Conflict
from jobs.models import ApiToken, Team, User, utcnow
from jobs.settings import Settings

TOKEN_PREFIX = "hmkd_"
# `hmkd_` and 12 random characters (72 bits): two tokens never share it in practice, and the
# 31 characters (186 bits) it leaves out keep it far from a usable token
SHOWN_PREFIX_CHARS = len(TOKEN_PREFIX) + 12
LEGACY_PREFIX_CHARS = 8  # what tokens made before 0007 store as their prefix
MAX_TOKEN_CHARS = 200  # far above a real token; refuses megabyte headers before hashing them
LAST_USED_RESOLUTION = timedelta(minutes=1)  # one write a minute per token, not one per request
LOCAL_TEAM, LOCAL_ADMIN = "local", "admin"


class AlreadyExists(Conflict):
    """A user (or other unique name) that exists already."""


class UnknownToken(LookupError):
    """No (or no single) token matches what was given."""


class UnknownUser(LookupError):
    """No user of that name."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def generate_token() -> str:
    """A fresh secret: 256 random bits, prefixed so that secret scanners and people spot it."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def create_team(session: Session, name: str) -> Team:
    """The team named `name`, created if missing."""
    team = session.scalar(select(Team).where(Team.name == name))
    if team is None:
        team = Team(name=name)
        session.add(team)
        session.flush()
    return team


def get_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise UnknownUser(
            f"no user {name!r}: create it with `hmkd users create {name} --team TEAM`"
        )
    return user


def create_user(session: Session, *, name: str, team_name: str, is_admin: bool = False) -> User:
    """A new user in `team_name` (created if missing); AlreadyExists if the name is taken."""
    if not name or not name.isprintable() or len(name) > 100:
        raise ValueError(f"user name {name!r} must be 1-100 printable characters")
    existing = session.scalar(select(User).where(User.name == name))
    if existing is not None:
        raise AlreadyExists(
            f"user {name!r} already exists (team {existing.team.name}); "
            f"issue another token with `hmkd tokens create --user {name}`"
        )
    user = User(name=name, team=create_team(session, team_name), is_admin=is_admin)
    session.add(user)
    session.flush()
    return user


def create_token(session: Session, user: User, name: str = "") -> tuple[str, ApiToken]:
    """A new token for `user`: the plain token (show it once) and its stored row."""
    token = generate_token()
    row = ApiToken(
        user_id=user.id,
        token_hash=hash_token(token),
        prefix=token[:SHOWN_PREFIX_CHARS],
        name=name,
        revoked=False,
    )
    session.add(row)
    session.flush()
    return token, row


def revoke_tokens(
    session: Session, *, prefix: str | None = None, user: User | None = None
) -> list[ApiToken]:
    """Revoke the token given as `prefix`, or every token of `user`; returns the tokens that
    were live. Takes effect on their next request: nothing caches a token.

    `prefix` is either the whole token (found by its hash: always one token) or its prefix
    exactly as `tokens list` shows it. Nothing is cut or guessed: a text longer than a shown
    prefix that is not the whole token revokes nothing, whatever prefix it starts with.
    UnknownToken if `prefix` names no live token, or is a prefix more than one live token
    shows (tokens from before 0007 may share their 8 characters): then give the whole token."""
    query = select(ApiToken).where(ApiToken.revoked.is_(False))
    if user is not None:
        query = query.where(ApiToken.user_id == user.id)
    if prefix is None:
        rows = list(session.scalars(query))
    else:
        rows = _named_tokens(session, query, prefix, user)
    for row in rows:
        row.revoked = True
    session.flush()
    return rows


def _named_tokens(
    session: Session, live: Select[tuple[ApiToken]], text: str, user: User | None
) -> list[ApiToken]:
    """The one token of `live` (the live tokens, of `user` if given) that `text` names: as the
    whole token or as its shown prefix, exactly. UnknownToken otherwise."""
    shown = _echo(text)
    if text and len(text) <= MAX_TOKEN_CHARS:
        digest = hash_token(text)
        row = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
        if row is not None and hmac.compare_digest(row.token_hash, digest):
            if row.revoked:
                raise UnknownToken(f"no live token: the token shown as {row.prefix!r} is revoked")
            if user is not None and row.user_id != user.id:
                raise UnknownToken(f"no live token of user {user.name!r} is that token")
            return [row]
    rows = list(session.scalars(live.where(ApiToken.prefix == text)))
    if len(rows) > 1:
        raise UnknownToken(
            f"more than one live token is shown as {shown!r} (tokens made before prefixes "
            f"grew to {SHOWN_PREFIX_CHARS} characters may share theirs): give the whole token "
            "to revoke one of them"
        )
    if not rows:
        raise UnknownToken(
            f"no live token is shown as {shown!r}: give its prefix exactly as "
            "`hmkd tokens list` shows it, or the whole token (a longer text is taken only as "
            "the whole token, never cut to a prefix)"
        )
    return rows


def _echo(text: str) -> str:
    """`text` as an error may repeat it: never more than a shown prefix of a possible secret."""
    return text if len(text) <= SHOWN_PREFIX_CHARS else text[:SHOWN_PREFIX_CHARS] + "..."


def list_tokens(session: Session, user: User | None = None) -> list[ApiToken]:
    query = select(ApiToken).order_by(ApiToken.id)
    if user is not None:
        query = query.where(ApiToken.user_id == user.id)
    return list(session.scalars(query))


def authenticate(session: Session, token: str, *, now: datetime | None = None) -> User | None:
    """The user owning `token`, or None for an unknown, revoked or malformed token."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        return None
    digest = hash_token(token)
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
    if row is None or row.revoked or not hmac.compare_digest(row.token_hash, digest):
        return None
    now = now or utcnow()
    last = row.last_used_at
    if last is None or now - _aware(last) >= LAST_USED_RESOLUTION:
        row.last_used_at = now
    return row.user


def _aware(t: datetime) -> datetime:
    """SQLite returns naive datetimes; they were written as UTC."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def ensure_local_admin(settings: Settings) -> str:
    """The embedded default's admin token, kept in `<data_dir>/token` for the CLI to find.

    Creates team `local` and user `admin` if missing. A token file that still authenticates is
    reused; a missing, revoked or foreign one is replaced by a fresh token. The file is 0600: it
    is a password.
    """
    from jobs.db import session_scope

    path = Path(settings.data_dir) / "token"
    existing = _read_token(path)
    with session_scope(settings.database_url) as session:
        if existing is not None:
            user = authenticate(session, existing)
            if user is not None and user.name == LOCAL_ADMIN:
                return existing
        admin = session.scalar(select(User).where(User.name == LOCAL_ADMIN))
        if admin is None:
            admin = create_user(session, name=LOCAL_ADMIN, team_name=LOCAL_TEAM, is_admin=True)
        token, _ = create_token(session, admin, name="local")
    _write_secret(path, token + "\n")
    return token


def _read_token(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return text or None


def _write_secret(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 from the first byte, replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a leftover file
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
