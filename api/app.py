"""The FastAPI application: `create_app(settings)` wires settings, limits, errors and routes.

It refuses to start on a database that Alembic has not brought to the current revision, because
an API answering 500s on every request is worse than one that says what to run.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.lifecycle import Conflict, InvalidJob, NotFound
from jobs.schemas import has_control_characters
from jobs.settings import Settings, get_settings
from jobs.storage import StorageError

log = logging.getLogger(__name__)

DESCRIPTION = """\
Submit knowledge-distillation jobs for small-object detectors, follow their progress and
download the distilled students.

Every endpoint but `/v1/health`, `/v1/ready`, `/metrics` (Prometheus) and
`/v1/downloads/{link}` (a short-lived signed link from `POST /v1/jobs/{id}/artifact-links`)
needs `Authorization: Bearer <token>`. The web dashboard is served at `/`.
A user sees and acts on their own team's jobs only; any other job id is a 404.
Errors answer `{"detail": ...}`; validation errors (422) list each problem with its `field`
path, e.g. `data.train.images`.
"""

TAGS = [
    {"name": "jobs", "description": "Submit, list, follow, cancel and retry training jobs."},
    {"name": "artifacts", "description": "Checkpoints, `student.pt`, `eval.json`: streamed."},
    {"name": "datasets", "description": "Upload COCO exports, register server folders, stats."},
    {"name": "queue", "description": "Queued and running jobs per queue, workers and GPUs."},
    {"name": "users", "description": "Who a token belongs to."},
    {"name": "health", "description": "Liveness and readiness probes (no token needed)."},
]


def package_version() -> str:
    try:
        return version("hmkd")
    except PackageNotFoundError:
        return "0+unknown"


class BodySizeLimit:
    """Answer 413 before reading more than `max_bytes` of a request body.

    A declared Content-Length is refused at once; a chunked body is counted as it arrives and
    refused when it passes the limit (the route is still reading it, so nothing was sent yet).
    """

    # a dataset upload's chunk (PUT /v1/datasets/uploads/<id>) has its own, larger limit
    CHUNK_PATH = re.compile(r"^/v1/datasets/uploads/[^/]+$")

    def __init__(self, app: ASGIApp, max_bytes: int, chunk_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.chunk_bytes = chunk_bytes or max_bytes

    def _limit(self, scope: Scope) -> tuple[int, str]:
        if scope.get("method") == "PUT" and self.CHUNK_PATH.match(scope.get("path", "")):
            return self.chunk_bytes, "send smaller chunks (HMKD_UPLOAD_CHUNK_BYTES on the server)"
        return self.max_bytes, "send a smaller spec (or raise HMKD_MAX_BODY_BYTES on the server)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, advice = self._limit(scope)
        message_text = f"request body over {limit} bytes; {advice}"
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                response = JSONResponse({"detail": message_text}, status_code=413)
                await response(scope, receive, send)
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, message_text)
            return message

        await self.app(scope, limited_receive, send)


def _problem_422(field: str, msg: str, loc: list[str]) -> JSONResponse:
    detail = [{"field": field, "msg": msg, "type": "control_character", "loc": loc}]
    return JSONResponse({"detail": detail}, status_code=422)


class RejectControlCharacters:
    """Answer 422 naming the parameter when a path or query value holds a control character.

    Checked once, before routing, for every route: the database never sees such a value, and
    no route has to remember the check.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from urllib.parse import parse_qsl

        msg = "must not contain control characters (NUL, newline, ...)"
        if has_control_characters(scope.get("path", "")):
            await _problem_422("path", f"the URL path {msg}", ["path"])(scope, receive, send)
            return
        # decoded as the routes read it (Starlette's QueryParams): %-escapes as UTF-8, so the
        # bytes 0x80-0x9f inside a character such as `ā` or `数` are not taken for C1 controls
        query = scope.get("query_string", b"").decode("latin-1")
        for name, value in parse_qsl(query, keep_blank_values=True):
            if has_control_characters(name) or has_control_characters(value):
                safe = name.encode("unicode_escape").decode("ascii")
                response = _problem_422(safe, f"query parameter {msg}", ["query", safe])
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# A request can fail validation in many places at once (a spec of 100 000 unknown keys);
# the answer names the first of them and counts the rest instead of echoing them all.
MAX_REPORTED_ERRORS = 50


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    """`("body", "data", "train", "images")` -> `data.train.images`."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or "<body>"


def _reported(e: dict[str, Any]) -> dict[str, Any]:
    """One error as the API reports it. JSON that does not parse has no field: its location
    is the character offset where parsing stopped, said in the message instead."""
    loc, msg = tuple(e.get("loc", ())), e.get("msg", "")
    if e.get("type") == "json_invalid":
        at = [p for p in loc if isinstance(p, int)]
        loc = ("body",)
        msg = f"{msg} at character {at[0]}" if at else msg
    return {
        "field": _field(loc),
        "msg": msg,
        "type": e.get("type", ""),
        "loc": [str(p)[:200] for p in loc],
    }


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    everything = exc.errors()
    errors = [_reported(e) for e in everything[:MAX_REPORTED_ERRORS]]
    if len(everything) > MAX_REPORTED_ERRORS:
        more = len(everything) - MAX_REPORTED_ERRORS
        errors.append(
            {
                "field": "<body>",
                "msg": f"{more} more error(s) not listed; fix the ones above first",
                "type": "too_many_errors",
                "loc": [],
            }
        )
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


async def _invalid_job(request: Request, exc: InvalidJob) -> JSONResponse:
    detail = [
        {
            "field": exc.field,
            "msg": exc.message,
            "type": "invalid_job",
            "loc": ["body", *exc.field.split(".")],
        }
    ]
    return JSONResponse({"detail": detail}, status_code=422)


async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


async def _conflict(request: Request, exc: Conflict) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=409)


async def _storage_down(request: Request, exc: Exception) -> JSONResponse:
    """Object storage unreachable or refusing: the artifact exists, try again later."""
    log.warning("object storage: %s", exc)
    return JSONResponse(
        {"detail": "artifact storage is unavailable; try again shortly"},
        status_code=503,
        headers={"Retry-After": "10"},
    )


_PROBLEM = {"$ref": "#/components/schemas/Problem"}
_COMMON = {
    "422": "A path or query parameter holds a control character, or a value is out of range.",
    "413": "Body too large.",
}


def _add_request_models(schema: dict[str, Any]) -> None:
    """Bodies a route validates itself, off the event loop (`POST /v1/jobs` and its JobSpec),
    are described here: FastAPI only describes the bodies it validates."""
    from jobs.schemas import JobSpec

    spec = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in spec.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components.setdefault("JobSpec", spec)


def document_common_errors(app: FastAPI) -> None:
    """Add the answers every route can give to the OpenAPI description, in one place.

    The control-character guard and the body limit run before routing, so no route declares
    them; a route with a body can also answer 400 when the body is not UTF-8 JSON. Errors are
    always JSON, also on routes whose success is text (logs) or an event stream.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        _add_request_models(schema)
        problem = {"application/json": {"schema": _PROBLEM}}
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                responses = op.setdefault("responses", {})
                for code, text in _COMMON.items():
                    responses.setdefault(code, {"description": text, "content": problem})
                if "requestBody" in op:
                    responses.setdefault(
                        "400", {"description": "The body is not UTF-8 JSON.", "content": problem}
                    )
                for code, answer in responses.items():
                    if code[0] in "45":
                        answer.setdefault("content", {}).setdefault(
                            "application/json", {"schema": _PROBLEM}
                        )
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API over `settings` (default: from `HMKD_*` variables)."""
    from api.metrics import install_metrics
    from api.routes import admin, artifacts, datasets, downloads, health, jobs, me, methods, queue
    from api.routes.dashboard import install_dashboard

    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from jobs.migrate import check_current

        check_current(settings.database_url)  # DatabaseNotMigrated says what to run
        yield
        celery = getattr(app.state, "celery", None)
        if celery is not None:
            celery.close()

    app = FastAPI(
        title="HMKD job service",
        description=DESCRIPTION,
        version=package_version(),
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.celery = None
    app.state.sse_poll_seconds = 0.5
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        chunk_bytes=settings.upload_chunk_bytes,
    )
    app.add_middleware(RejectControlCharacters)
    install_metrics(app, settings)  # outermost middleware: 413s are timed too
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(InvalidJob, _invalid_job)  # type: ignore[arg-type]
    app.add_exception_handler(NotFound, _not_found)  # type: ignore[arg-type]
    app.add_exception_handler(Conflict, _conflict)  # type: ignore[arg-type]
    app.add_exception_handler(StorageError, _storage_down)
    for module in (jobs, methods, datasets, artifacts, downloads, queue, me, admin, health):
        app.include_router(module.router, prefix="/v1")
    install_dashboard(app)
    document_common_errors(app)
    return app


_celery_lock = threading.Lock()


def celery_of(app: FastAPI) -> Any:
    """The app's Celery client (publishing only), made on first use: it holds a connection
    pool, so one per app, shared by the request threads."""
    with _celery_lock:
        if app.state.celery is None:
            from jobs.broker import make_celery

            app.state.celery = make_celery(app.state.settings)
        return app.state.celery
