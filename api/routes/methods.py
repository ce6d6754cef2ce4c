"""`/v1/methods`: the distillation methods a spec's `distill.method` accepts.

Read from `hmkd_core.spec.METHODS`, the list the spec validates against, so the dashboard's
filter and any client learn a new method without a change of their own.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import CurrentUser
from api.schemas import Problem
from hmkd_core.spec import METHOD_SUMMARIES, METHODS

router = APIRouter(prefix="/methods", tags=["jobs"])


class MethodPublic(BaseModel):
    name: str
    summary: str


@router.get(
    "",
    response_model=list[MethodPublic],
    summary="Distillation methods",
    responses={401: {"model": Problem, "description": "Missing or unknown token."}},
)
def get_methods(user: CurrentUser) -> list[MethodPublic]:
    """Each value `distill.method` accepts, with what it is; `none` trains without a teacher."""
    return [MethodPublic(name=m, summary=METHOD_SUMMARIES[m]) for m in METHODS]
