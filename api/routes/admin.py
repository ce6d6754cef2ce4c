"""`/v1/admin`: revoke a token, disable a user, set a team's share and quotas, without SQL and
without shell access.

The same operations as `hmkd tokens revoke` and `hmkd users disable` (one implementation in
`jobs.auth`); an administrator's token is required, and the effect is on the next request of
the revoked token, since nothing caches tokens.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status
from pydantic import BaseModel, Field, field_validator

from api.deps import AdminUser, SessionDep
from api.schemas import Problem
from hmkd_core.spec import StrictModel
from jobs import admin as admin_commands
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
    prefix: Annotated[
        str,
        Path(
            min_length=1,
            max_length=64,
            description="The token's prefix exactly as listed, or the whole token.",
        ),
    ],
) -> Revoked:
    """Revoke one live token, named by its prefix exactly as `hmkd tokens list` shows it, or by
    the whole token. A longer text that is not the whole token revokes nothing (it is never cut
    to a prefix). Tokens made before prefixes grew to 17 characters show 8, which two tokens
    may share: such a shared prefix is a 404 that asks for the whole token."""
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


class TeamPublic(BaseModel):
    name: str
    share: float = Field(description="Weight in fair share against the other teams.")
    gpu_quota: int | None = Field(description="Most GPUs its jobs hold at once; null: none.")
    max_running: int | None = Field(description="Most jobs running at once; null: default.")
    gpus_running: int = Field(description="GPUs (CPU jobs as one) its live jobs hold now.")


class TeamChange(StrictModel):
    """Fields left out stay as they are; `null` clears a quota or cap."""

    share: float | None = Field(None, gt=0, le=1e6)
    gpu_quota: int | None = Field(None, ge=0, le=1_000_000)
    max_running: int | None = Field(None, ge=1, le=1_000_000)

    @field_validator("share")
    @classmethod
    def _share_is_not_cleared(cls, v: float | None) -> float:
        if v is None:  # given as null (a field left out is not validated)
            raise ValueError("a team always has a share: give a number above 0, or leave it out")
        return v


@router.get(
    "/teams", response_model=list[TeamPublic], summary="Teams and their shares", responses=_ERRORS
)
def get_teams(session: SessionDep, admin: AdminUser) -> list[TeamPublic]:
    """Every team with its share, quotas and the GPUs it holds now."""
    return [TeamPublic(**vars(t)) for t in admin_commands.list_teams(session)]


@router.put(
    "/teams/{name}",
    response_model=TeamPublic,
    summary="Set a team's share or quotas",
    responses=_ERRORS,
)
def put_team(
    session: SessionDep,
    admin: AdminUser,
    body: TeamChange,
    name: Annotated[str, Path(min_length=1, max_length=100)],
) -> TeamPublic:
    """The same as `hmkd teams set`: share, GPU quota, job cap."""
    given = {k: getattr(body, k) for k in body.model_fields_set}
    try:
        info = admin_commands.change_team(session, name, **given)
    except admin_commands.UnknownTeam as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(err)) from None
    return TeamPublic(**vars(info))
