"""Request dependencies: the settings, a database session, the caller, and a job they may see.

The session is function-scoped so that its commit happens before the answer leaves: a client
that gets 201 can read its job back at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from jobs.db import session_scope
from jobs.lifecycle import NotFound, visible_job
from jobs.models import Job, User
from jobs.settings import Settings


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    with session_scope(settings.database_url) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]

_bearer = HTTPBearer(
    auto_error=False,
    description="An API token: `hmkd tokens create --user NAME` prints one.",
)

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def get_current_user(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User:
    """The token's user; 401 (with a challenge) for a missing, unknown or revoked token."""
    from jobs.auth import authenticate

    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "send `Authorization: Bearer <token>`; `hmkd tokens create --user NAME` makes one",
            headers=_UNAUTHORIZED,
        )
    user = authenticate(session, credentials.credentials)
    if user is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "token unknown or revoked; ask an admin for a new one (`hmkd tokens create`)",
            headers=_UNAUTHORIZED,
        )
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def get_admin_user(user: CurrentUser) -> User:
    """The caller, if an administrator; 403 otherwise."""
    if not user.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this needs an administrator's token")
    return user


AdminUser = Annotated[User, Depends(get_admin_user)]


def get_visible_job(
    session: SessionDep,
    user: CurrentUser,
    job_id: Annotated[str, Path(description="The job's id (32 hex characters).")],
) -> Job:
    """The job if it is the caller's team's; any other id, theirs or unknown, is a 404."""
    try:
        return visible_job(session, user, job_id)
    except NotFound as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(err)) from None


VisibleJob = Annotated[Job, Depends(get_visible_job)]
