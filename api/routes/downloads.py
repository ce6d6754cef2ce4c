"""Signed download links: `POST /v1/jobs/{id}/artifact-links` (token) hands out a link that
`GET /v1/downloads/{link}` (no token) honours for a few minutes.

They exist so that a browser can save a multi-gigabyte checkpoint by plain navigation,
streamed to disk, without the API token ever appearing in a URL (see `jobs.download_links`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Response, status
from sqlalchemy import select

from api.deps import CurrentUser, SessionDep, SettingsDep, VisibleJob
from api.routes.artifacts import artifact_file
from api.schemas import ArtifactLink, ArtifactLinkRequest, Problem
from jobs.download_links import (
    DownloadGrant,
    ExpiredLink,
    InvalidLink,
    sign_link,
    signing_key,
    verify_link,
)
from jobs.models import Artifact, Job, User

router = APIRouter(tags=["artifacts"])

_NOT_FOUND = {"model": Problem, "description": "No such job in your team, or no such artifact."}


@router.post(
    "/jobs/{job_id}/artifact-links",
    status_code=status.HTTP_201_CREATED,
    response_model=ArtifactLink,
    summary="A short-lived download link for an artifact",
    responses={
        401: {"model": Problem, "description": "Missing or unknown token."},
        404: _NOT_FOUND,
    },
)
def create_artifact_link(
    body: ArtifactLinkRequest,
    job: VisibleJob,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
) -> ArtifactLink:
    """Sign a link to one artifact of the job, valid for `HMKD_DOWNLOAD_LINK_SECONDS` (300 s
    by default) for the caller's team. Fetch it without a token; it honours `Range`."""
    row = session.scalar(
        select(Artifact.id).where(Artifact.job_id == job.id, Artifact.name == body.name)
    )
    if row is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"job {job.id} has no artifact {body.name!r}"
        )
    expires = datetime.now(UTC) + timedelta(seconds=settings.download_link_seconds)
    expires = expires.replace(microsecond=0)
    grant = DownloadGrant(
        job_id=job.id, name=body.name, team_id=user.team_id, user_id=user.id, expires_at=expires
    )
    link = sign_link(signing_key(settings), grant)
    return ArtifactLink(url=f"/v1/downloads/{link}", expires_at=expires)


@router.get(
    "/downloads/{link}",
    summary="Download through a signed link (no token)",
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The file."},
        206: {"description": "The requested byte range."},
        304: {"description": "Unchanged: the If-None-Match ETag is current."},
        403: {"model": Problem, "description": "Not a link this service signed, or altered."},
        404: _NOT_FOUND,
        410: {"model": Problem, "description": "The link expired: ask for a new one."},
        416: {"description": "Range outside the file."},
    },
)
def download_by_link(
    link: str,
    session: SessionDep,
    settings: SettingsDep,
    if_none_match: Annotated[str | None, Header()] = None,
    range_: Annotated[str | None, Header(alias="range", include_in_schema=False)] = None,
    if_range: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """Stream the artifact the link names, if the link is genuine and current and the job
    still belongs to the team (and user) it was signed for."""
    try:
        grant = verify_link(signing_key(settings), link)
    except ExpiredLink as err:
        raise HTTPException(status.HTTP_410_GONE, str(err)) from None
    except InvalidLink as err:
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(err)) from None
    job = session.get(Job, grant.job_id)
    user = session.get(User, grant.user_id)
    if job is None or job.team_id != grant.team_id or user is None or user.team_id != job.team_id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {grant.job_id} for this link")
    return artifact_file(
        session,
        settings,
        job.id,
        grant.name,
        if_none_match=if_none_match,
        range_header=range_,
        if_range=if_range,
        headers={"Referrer-Policy": "no-referrer", "Cache-Control": "private, no-store"},
    )
