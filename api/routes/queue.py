"""`/v1/queue`: what waits and what runs, per queue, and the workers serving them."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentUser, SessionDep
from api.queries import queue_overview
from api.schemas import Problem, QueueOverview

router = APIRouter(prefix="/queue", tags=["queue"])


@router.get(
    "",
    response_model=QueueOverview,
    summary="Queue overview",
    responses={401: {"model": Problem, "description": "Missing or unknown token."}},
)
def get_queue(session: SessionDep, user: CurrentUser) -> QueueOverview:
    """Queued/running counts per queue (all teams share the GPUs), your queued jobs with their
    positions, and each worker's queues, GPUs and heartbeat age."""
    return queue_overview(session, user)
