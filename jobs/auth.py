"""Teams, users and API tokens.

A token is shown once, at creation; the database keeps only its sha256 and its first characters
(to recognise it in listings). A stolen database therefore yields no usable token, and a lookup
by hash compares secrets in constant time: the attacker-controlled token never meets a stored
secret byte by byte.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.lifecycle import Conflict
from jobs.models import ApiToken, Team, User, utcnow
from jobs.settings import Settings

TOKEN_PREFIX = "hmkd_"
SHOWN_PREFIX_CHARS = 8
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
    """Revoke the token shown as `prefix` (as `tokens list` prints it), or every token of
    `user`; returns the tokens that were live. Takes effect on their next request: nothing
    caches a token. UnknownToken if `prefix` matches none, or more than one."""
    query = select(ApiToken).where(ApiToken.revoked.is_(False))
    if prefix is not None:
        if len(prefix) < SHOWN_PREFIX_CHARS:
            raise UnknownToken(
                f"token prefix {prefix!r} is too short: give the {SHOWN_PREFIX_CHARS} "
                "characters `hmkd tokens list` shows"
            )
        query = query.where(ApiToken.prefix == prefix[:SHOWN_PREFIX_CHARS])
    if user is not None:
        query = query.where(ApiToken.user_id == user.id)
    rows = list(session.scalars(query))
    if prefix is not None and len(rows) != 1:
        raise UnknownToken(
            f"{'no live token' if not rows else 'more than one token'} starts with {prefix!r}; "
            "see `hmkd tokens list`"
        )
    for row in rows:
        row.revoked = True
    session.flush()
    return rows


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
