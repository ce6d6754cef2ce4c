"""`/v1/health` (the process answers) and `/v1/ready` (its database and broker do too)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response, status

from api.app import celery_of, package_version
from api.schemas import Health, Readiness
from jobs.settings import Settings

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Liveness")
def health() -> Health:
    """Always 200 while the process serves requests; no token needed."""
    return Health(version=package_version())


def _database_status(settings: Settings) -> str:
    from jobs.migrate import DatabaseNotMigrated, check_current

    try:
        check_current(settings.database_url)
    except DatabaseNotMigrated as err:
        return str(err)
    except Exception as err:  # unreachable, bad credentials, ...: report, don't crash
        # no token is needed here: name the kind of failure, not hosts or users
        log.warning("readiness: database check failed: %s", err)
        return f"unreachable: {type(err).__name__}"
    return "ok"


def _broker_status(request: Request) -> str:
    try:
        with celery_of(request.app).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception as err:  # kombu raises transport-specific errors
        log.warning("readiness: broker check failed: %s", err)
        return f"unreachable: {type(err).__name__}"
    return "ok"


@router.get(
    "/ready",
    response_model=Readiness,
    summary="Readiness",
    responses={503: {"model": Readiness, "description": "Database or broker not ready."}},
)
def ready(request: Request, response: Response) -> Readiness:
    """200 when the database is reachable and migrated and the broker accepts connections;
    503 otherwise, saying which and why. No token needed."""
    settings: Settings = request.app.state.settings
    answer = Readiness(
        ready=False, database=_database_status(settings), broker=_broker_status(request)
    )
    answer.ready = answer.database == "ok" and answer.broker == "ok"
    if not answer.ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return answer
