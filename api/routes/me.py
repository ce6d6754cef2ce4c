"""`/v1/me`: who the token belongs to, so a client can check a token and show whose it is."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentUser
from api.schemas import Problem, UserPublic

router = APIRouter(tags=["users"])


@router.get(
    "/me",
    response_model=UserPublic,
    summary="The caller",
    responses={401: {"model": Problem, "description": "Missing or unknown token."}},
)
def get_me(user: CurrentUser) -> UserPublic:
    """The token's user and team: the dashboard checks a pasted token with it."""
    return UserPublic(name=user.name, team=user.team.name, is_admin=user.is_admin)
