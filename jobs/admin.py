"""What the admin commands do (`hmkd db upgrade`, `hmkd users create|disable`,
`hmkd tokens create|list|revoke`, `hmkd teams limit|retention|set|list`).

They work on the database named by the settings, directly: they are run on the server by whoever
holds its configuration, and the first user of a team deployment has no token to call the API
with. The CLI only parses arguments and prints what these return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobs import auth, migrate
from jobs.db import session_scope
from jobs.settings import Settings


@dataclass(frozen=True)
class Upgraded:
    database: str  # password hidden
    before: str | None
    after: str

    def __str__(self) -> str:
        if self.before == self.after:
            return f"database {self.database} is up to date (revision {self.after})"
        return f"database {self.database} upgraded from {self.before or 'empty'} to {self.after}"


@dataclass(frozen=True)
class IssuedToken:
    user: str
    team: str
    is_admin: bool
    token: str  # the only time the plain token exists outside the client


def db_upgrade(settings: Settings, revision: str = "head") -> Upgraded:
    """Migrate the configured database to `revision` (default: this code's head)."""
    url = settings.database_url
    before = migrate.current_revision(url)
    migrate.upgrade(url, revision)
    after = migrate.current_revision(url)
    assert after is not None  # an upgrade always leaves a revision behind
    return Upgraded(migrate.display_url(url), before, after)


def create_user(
    settings: Settings, name: str, *, team: str, is_admin: bool = False, token_name: str = ""
) -> IssuedToken:
    """Create user `name` in `team` (created if missing) with a first token.

    Raises auth.AlreadyExists if the name is taken, DatabaseNotMigrated on an old schema.
    """
    migrate.check_current(settings.database_url)
    with session_scope(settings.database_url) as session:
        user = auth.create_user(session, name=name, team_name=team, is_admin=is_admin)
        token, _ = auth.create_token(session, user, name=token_name or "initial")
        return IssuedToken(user.name, user.team.name, user.is_admin, token)


def create_token(settings: Settings, user: str, *, name: str = "") -> IssuedToken:
    """A new token for an existing user; raises auth.UnknownUser naming the command to run."""
    migrate.check_current(settings.database_url)
    with session_scope(settings.database_url) as session:
        found = auth.get_user(session, user)
        token, _ = auth.create_token(session, found, name=name)
        return IssuedToken(found.name, found.team.name, found.is_admin, token)


@dataclass(frozen=True)
class TokenInfo:
    prefix: str  # enough to name it, never to use it
    user: str
    name: str
    created_at: str
    last_used_at: str | None
    revoked: bool


def _info(row: object) -> TokenInfo:
    from jobs.models import ApiToken

    assert isinstance(row, ApiToken)
    return TokenInfo(
        prefix=row.prefix,
        user=row.user.name,
        name=row.name,
        created_at=row.created_at.isoformat(timespec="seconds"),
        last_used_at=row.last_used_at.isoformat(timespec="seconds") if row.last_used_at else None,
        revoked=row.revoked,
    )


def list_tokens(settings: Settings, user: str | None = None) -> list[TokenInfo]:
    """Every token (of `user`), live and revoked, by prefix; never the token itself."""
    migrate.check_current(settings.database_url)
    with session_scope(settings.database_url) as session:
        found = auth.get_user(session, user) if user else None
        return [_info(row) for row in auth.list_tokens(session, found)]


def revoke_token(settings: Settings, prefix: str) -> TokenInfo:
    """Revoke the token `hmkd tokens list` shows as `prefix` (or given whole); its next
    request is a 401."""
    migrate.check_current(settings.database_url)
    with session_scope(settings.database_url) as session:
        (row,) = auth.revoke_tokens(session, prefix=prefix)
        return _info(row)


def disable_user(settings: Settings, name: str) -> int:
    """Revoke every token of user `name`; returns how many were live. The user and their jobs
    stay (the team still sees the jobs); `hmkd tokens create --user` lets them in again."""
    migrate.check_current(settings.database_url)
    with session_scope(settings.database_url) as session:
        user = auth.get_user(session, name)
        return len(auth.revoke_tokens(session, user=user))


class UnknownTeam(LookupError):
    """No team of that name."""


def set_team_cap(settings: Settings, team: str, max_running: int | None) -> int | None:
    """Cap how many of `team`'s jobs run at once (None: the deployment's default,
    `HMKD_MAX_RUNNING_PER_TEAM`); returns the cap now in force. Running jobs are not stopped:
    a lowered cap takes effect as they end."""
    from sqlalchemy import select

    from jobs.models import Team

    if max_running is not None and max_running < 1:
        raise ValueError(f"--max-running must be at least 1, got {max_running}")
    migrate.check_current(settings.database_url)
    with session_scope(settings.database_url) as session:
        row = session.scalar(select(Team).where(Team.name == team))
        if row is None:
            raise UnknownTeam(f"no team {team!r}: teams are made by `hmkd users create --team`")
        row.max_running = max_running
        return max_running if max_running is not None else settings.max_running_per_team


def set_team_retention(settings: Settings, team: str, changes: dict[str, object] | None) -> Any:
    """Set what `team`'s succeeded jobs keep of their checkpoints; `changes` (keep_latest,
    keep_best; None values leave a field as it is) is merged into the team's policy, None
    resets it to the default. Returns the policy now in force (a `Retention`)."""
    from sqlalchemy import select

    from jobs.models import Team
    from jobs.schemas import Retention

    migrate.check_current(settings.database_url)
    with session_scope(settings.database_url) as session:
        row = session.scalar(select(Team).where(Team.name == team))
        if row is None:
            raise UnknownTeam(f"no team {team!r}: teams are made by `hmkd users create --team`")
        if changes is None:
            row.retention = None
            return Retention()
        current = Retention.model_validate(row.retention or {})
        given = {k: v for k, v in changes.items() if v is not None}
        policy = Retention.model_validate({**current.model_dump(), **given})
        row.retention = policy.model_dump()
        return policy


@dataclass(frozen=True)
class TeamInfo:
    name: str
    share: float
    gpu_quota: int | None
    max_running: int | None
    gpus_running: int  # GPUs (CPU jobs as one) its live jobs hold now


_UNSET: Any = object()


def change_team(
    session: Any,
    name: str,
    *,
    share: float | None = None,
    gpu_quota: int | None = _UNSET,
    max_running: int | None = _UNSET,
) -> TeamInfo:
    """Set a team's fair share, GPU quota (None: none) or job cap (None: the default); what
    is not given stays. The one implementation behind `hmkd teams set` and
    `PUT /v1/admin/teams/{name}`. Running jobs are not stopped: a lower quota takes effect as
    they end."""
    from sqlalchemy import select

    from jobs.models import Team

    row = session.scalar(select(Team).where(Team.name == name))
    if row is None:
        raise UnknownTeam(f"no team {name!r}: teams are made by `hmkd users create --team`")
    if share is not None:
        if not 0 < share <= 1e6:
            raise ValueError(f"share must be above 0 (and at most 1e6), got {share}")
        row.share = float(share)
    if gpu_quota is not _UNSET:
        if gpu_quota is not None and gpu_quota < 0:
            raise ValueError(f"gpu quota must be 0 or more, got {gpu_quota}")
        row.gpu_quota = gpu_quota
    if max_running is not _UNSET:
        if max_running is not None and max_running < 1:
            raise ValueError(f"max running must be at least 1, got {max_running}")
        row.max_running = max_running
    session.flush()
    return team_info(session, row)


def team_info(session: Any, row: Any) -> TeamInfo:
    from jobs.scheduling import running_usage

    return TeamInfo(
        name=row.name,
        share=row.share,
        gpu_quota=row.gpu_quota,
        max_running=row.max_running,
        gpus_running=running_usage(session).get(row.id, 0),
    )


def list_teams(session: Any) -> list[TeamInfo]:
    from sqlalchemy import select

    from jobs.models import Team

    return [team_info(session, row) for row in session.scalars(select(Team).order_by(Team.name))]


def set_team(settings: Settings, name: str, **changes: Any) -> TeamInfo:
    """`change_team` on the configured database, for `hmkd teams set`."""
    migrate.check_current(settings.database_url)
    with session_scope(settings.database_url) as session:
        return change_team(session, name, **changes)
