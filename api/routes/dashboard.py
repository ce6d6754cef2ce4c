"""The web dashboard: `/` serves its page, `/dashboard/...` its scripts, styles and the vendored
chart library, all shipped inside the package (`api/dashboard/`), so an installed API serves it
with no build step and no network.

The files hold no data and need no token; every call the page makes goes to `/v1` with the
user's token in an `Authorization` header. The strict Content-Security-Policy allows scripts,
styles, images and connections from this origin only (no inline script, no eval, no framing),
so even a job name crafted as markup could not run code in a signed-in page.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

DASHBOARD_DIR = Path(__file__).resolve().parents[1] / "dashboard"
PREFIX = "/dashboard"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Revalidate on every load (ETag): an upgraded service must not run yesterday's scripts.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


class DashboardFiles(StaticFiles):
    """Static files with the dashboard's security headers on every answer."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


@router.api_route("/", methods=["GET", "HEAD"])
def dashboard_page() -> FileResponse:
    """The single page; views are chosen by the URL's fragment (`#/jobs/<id>`)."""
    return FileResponse(DASHBOARD_DIR / "index.html", headers=SECURITY_HEADERS)


def install_dashboard(app: FastAPI) -> None:
    """Serve the page at `/` and its files under `/dashboard`."""
    if not (DASHBOARD_DIR / "index.html").is_file():
        raise RuntimeError(
            f"dashboard files missing from {DASHBOARD_DIR}; reinstall hmkd (they are package data)"
        )
    app.include_router(router)
    app.mount(PREFIX, DashboardFiles(directory=DASHBOARD_DIR), name="dashboard")
