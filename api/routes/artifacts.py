"""`/v1/jobs/{id}/artifacts`: what a job wrote, each file streamed, and deletion of one.

Downloads carry the sha256 as a strong ETag (`If-None-Match` answers 304) and honour `Range`
(206, 416 when unsatisfiable) so a multi-gigabyte checkpoint resumes instead of restarting.
Names go through the artifact store, which refuses anything that would leave the job's folder.
With object storage (`HMKD_STORAGE_URL`), the bytes are streamed from the bucket, ranges and
all, and never land on the API's disk.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Response, status
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import SessionDep, SettingsDep, VisibleJob
from api.schemas import ArtifactPublic, Deleted, Problem
from jobs.models import Artifact
from jobs.settings import Settings
from jobs.storage import Storage

router = APIRouter(prefix="/jobs/{job_id}/artifacts", tags=["artifacts"])

_ERRORS = {
    401: {"model": Problem, "description": "Missing or unknown token."},
    404: {"model": Problem, "description": "No such job in your team, or no such artifact."},
}


@router.get("", response_model=list[ArtifactPublic], summary="List artifacts", responses=_ERRORS)
def list_artifacts(job: VisibleJob, session: SessionDep) -> list[ArtifactPublic]:
    """Checkpoints, `run/student.pt`, `run/eval.json`, ... with size and sha256."""
    rows = session.scalars(
        select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.name)
    )
    return [ArtifactPublic.from_row(r) for r in rows]


def _etag_matches(header: str, etag: str) -> bool:
    candidates = [c.strip() for c in header.split(",")]
    return "*" in candidates or etag in candidates or f"W/{etag}" in candidates


@router.get(
    "/{name:path}",
    response_class=FileResponse,
    summary="Download an artifact",
    responses={
        **_ERRORS,
        200: {"content": {"application/octet-stream": {}}, "description": "The file."},
        206: {"description": "The requested byte range."},
        304: {"description": "Unchanged: the If-None-Match ETag is current."},
        416: {"description": "Range outside the file."},
    },
)
def download_artifact(
    job: VisibleJob,
    name: str,
    session: SessionDep,
    settings: SettingsDep,
    if_none_match: Annotated[str | None, Header()] = None,
    range_: Annotated[str | None, Header(alias="range", include_in_schema=False)] = None,
    if_range: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """Stream one artifact; `ETag` is its quoted sha256."""
    return artifact_file(
        session,
        settings,
        job.id,
        name,
        if_none_match=if_none_match,
        range_header=range_,
        if_range=if_range,
    )


def artifact_file(
    session: Session,
    settings: Settings,
    job_id: str,
    name: str,
    *,
    if_none_match: str | None = None,
    range_header: str | None = None,
    if_range: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """The artifact's streamed answer (ETag, 304, Range), for the token route and for signed
    links alike; 404 for a name that is not a recorded file of the job."""
    from jobs.artifacts import ArtifactNameError, store_of

    missing = HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} has no artifact {name!r}")
    store = store_of(settings)
    try:
        path = store.storage.local_path(job_id, name)
    except ArtifactNameError:
        raise missing from None
    row = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if row is None or (path is not None and not path.is_file()):
        raise missing
    etag = f'"{row.sha256}"'
    if if_none_match is not None and _etag_matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    common = {"ETag": etag, "Cache-Control": "private, no-cache", **(headers or {})}
    if path is not None:
        return FileResponse(
            path, filename=Path(name).name, media_type="application/octet-stream", headers=common
        )
    size = store.storage.size(job_id, name)
    if size is None:
        raise missing
    return _streamed(store.storage, job_id, name, size, range_header, if_range, common)


_RANGE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")  # int() of 4300+ digits raises


def _streamed(
    storage: Storage,
    job_id: str,
    name: str,
    size: int,
    range_header: str | None,
    if_range: str | None,
    headers: dict[str, str],
) -> Response:
    """The object's bytes from storage, whole or one `Range`, answered as FileResponse answers
    for a file: a malformed range is 400, one outside the object 416, and a range under an
    `If-Range` that is not the current ETag gets the whole object. Several ranges at once are
    served whole (RFC 9110 lets a server ignore a Range)."""
    headers = {
        **headers,
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{Path(name).name}"',
    }
    wanted = (range_header or "").strip()
    if if_range is not None and if_range.strip() != headers["ETag"]:
        wanted = ""
    if not wanted or (wanted.startswith("bytes=") and "," in wanted):
        return StreamingResponse(
            storage.read(job_id, name),
            media_type="application/octet-stream",
            headers={**headers, "Content-Length": str(size)},
        )
    match = _RANGE.match(wanted)
    if match is None or match.groups() == ("", ""):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"malformed Range header {wanted!r}")
    first, last = match.groups()
    if first == "":  # the last N bytes
        start, end = max(0, size - int(last)), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        return Response(
            status_code=status.HTTP_416_RANGE_NOT_SATISFIABLE,
            headers={"Content-Range": f"bytes */{size}"},
        )
    return StreamingResponse(
        storage.read(job_id, name, start, end),
        status_code=status.HTTP_206_PARTIAL_CONTENT,
        media_type="application/octet-stream",
        headers={
            **headers,
            "Content-Range": f"bytes {start}-{end}/{size}",
            "Content-Length": str(end - start + 1),
        },
    )


@router.delete(
    "/{name:path}",
    response_model=Deleted,
    summary="Delete an artifact",
    responses={**_ERRORS, 409: {"model": Problem, "description": "The job has not ended."}},
)
def delete_artifact(
    job: VisibleJob, name: str, session: SessionDep, settings: SettingsDep
) -> Deleted:
    """Delete one file of an ended job, e.g. a checkpoint no longer wanted. `student.pt` is
    refused while a job not yet ended will load it."""
    from jobs.artifacts import ArtifactNameError, store_of
    from jobs.lifecycle import NotFound
    from jobs.retention import delete_artifact as remove

    try:
        freed = remove(session, store_of(settings), job, name)
    except ArtifactNameError:
        raise NotFound(f"job {job.id} has no artifact {name!r}") from None
    return Deleted(id=job.id, name=name, freed_bytes=freed)
