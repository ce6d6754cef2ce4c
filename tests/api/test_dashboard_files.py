"""The dashboard's files: served without a token under a strict CSP, complete (every module
that a module imports is there), and free of what that CSP would block or a job name could
abuse (inline script, style attributes, innerHTML)."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from api.routes.dashboard import DASHBOARD_DIR

IMPORT = re.compile(r"""^import\s.*?from\s+"(\.{1,2}/[^"]+)";""", re.MULTILINE | re.DOTALL)


def _modules() -> list[Path]:
    return sorted((DASHBOARD_DIR / "js").rglob("*.js"))


def test_page_and_files_need_no_token_and_carry_the_csp(app: object) -> None:
    anonymous = TestClient(app)  # type: ignore[arg-type]
    page = anonymous.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert anonymous.head("/").status_code == 200
    referenced = re.findall(r'(?:src|href)="(/dashboard/[^"]+)"', page.text)
    assert len(referenced) >= 5
    for url in referenced:
        r = anonymous.get(url)
        assert r.status_code == 200, url
        assert r.headers["content-security-policy"] == csp
    js = anonymous.get("/dashboard/js/main.js")
    assert "javascript" in js.headers["content-type"]
    assert anonymous.get("/v1/jobs").status_code == 401  # the data still needs a token


def test_every_imported_module_is_served(app: object) -> None:
    anonymous = TestClient(app)  # type: ignore[arg-type]
    modules = _modules()
    assert len(modules) >= 8
    for module in modules:
        for target in IMPORT.findall(module.read_text()):
            path = (module.parent / target).resolve()
            assert path.is_file(), f"{module.name} imports missing {target}"
            url = "/dashboard/" + path.relative_to(DASHBOARD_DIR).as_posix()
            assert anonymous.get(url).status_code == 200, url


def test_static_route_stays_inside_its_folder(app: object) -> None:
    anonymous = TestClient(app)  # type: ignore[arg-type]
    for url in ("/dashboard/../app.py", "/dashboard/%2e%2e/app.py", "/dashboard/nope.js"):
        assert anonymous.get(url).status_code == 404, url


def test_no_inline_code_nor_markup_from_strings() -> None:
    html = (DASHBOARD_DIR / "index.html").read_text()
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.DOTALL)
    assert scripts and all("src=" in attrs and not body.strip() for attrs, body in scripts)
    assert " style=" not in html and "<style" not in html
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers
    for module in _modules():
        text = module.read_text()
        for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "eval(", "new Function"):
            assert banned not in text, f"{module.name} uses {banned}"
        assert "?token=" not in text and "access_token" not in text


def test_vendored_chart_library_is_recorded() -> None:
    vendor = DASHBOARD_DIR / "vendor"
    assert {"uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE"} <= {
        p.name for p in vendor.iterdir()
    }
    readme = (DASHBOARD_DIR / "README.md").read_text()
    assert "uplot@1.6.32" in readme and "sha256" in readme
