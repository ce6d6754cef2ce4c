"""`/v1/admin`: revoke a token, disable a user, without SQL and without shell access.

The same operations as `hmkd tokens revoke` and `hmkd users disable` (one implementation in
`jobs.auth`); an administrator's token is required, and the effect is on the next request of
the revoked token, since nothing caches tokens.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status
from pydantic import BaseModel

from api.deps import AdminUser, SessionDep
from api.schemas import Problem
from jobs import auth

router = APIRouter(prefix="/admin", tags=["users"])

_ERRORS = {
    401: {"model": Problem, "description": "Missing or unknown token."},
    403: {"model": Problem, "description": "Not an administrator's token."},
    404: {"model": Problem, "description": "No such token or user."},
}


class Revoked(BaseModel):
    revoked: list[str]  # prefixes of the tokens that were live


@router.post(
    "/tokens/{prefix}/revoke",
    response_model=Revoked,
    summary="Revoke a token",
    responses=_ERRORS,
)
def revoke_token(
    session: SessionDep,
    admin: AdminUser,
    prefix: Annotated[str, Path(min_length=1, max_length=64, description="As listed.")],
) -> Revoked:
    """Revoke the one live token whose shown prefix is `prefix`."""
    try:
        rows = auth.revoke_tokens(session, prefix=prefix)
    except auth.UnknownToken as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(err)) from None
    return Revoked(revoked=[r.prefix for r in rows])


@router.post(
    "/users/{name}/disable",
    response_model=Revoked,
    summary="Disable a user (revoke all their tokens)",
    responses=_ERRORS,
)
def disable_user(
    session: SessionDep,
    admin: AdminUser,
    name: Annotated[str, Path(min_length=1, max_length=100)],
) -> Revoked:
    """Revoke every live token of user `name`; their jobs stay with the team."""
    try:
        user = auth.get_user(session, name)
    except auth.UnknownUser as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(err)) from None
    return Revoked(revoked=[r.prefix for r in auth.revoke_tokens(session, user=user)])
