"""A live service for the browser tests: a real `hmkd serve` (API + one Celery worker) on a
free port over a temporary data folder (SQLite database and broker), tiny SmallDigits under its
dataset root, and a headless system Chromium driven by Playwright.

Everything is module-scoped: the jobs train once (a few seconds each on CPU) and every test
reads the same service, so the module stays well under two minutes on two cores.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import tiny_model, tiny_spec_dict

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("HMKD_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TERMINAL = {"succeeded", "failed", "cancelled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveService:
    url: str
    token: str
    data_dir: Path
    digits: dict[str, Path]
    jobs: dict[str, str] = field(default_factory=dict)  # role -> job id

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def submit(self, name: str, **sections: Any) -> str:
        spec = {"name": name, **tiny_spec_dict(self.digits, **sections)}
        with self.client() as c:
            r = c.post("/v1/jobs", json=spec)
            assert r.status_code == 201, r.text
            return r.json()["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        with self.client() as c:
            r = c.get(f"/v1/jobs/{job_id}")
            r.raise_for_status()
            return r.json()

    def wait(self, job_id: str, states: set[str], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] in states:
                return job
            if time.monotonic() > deadline:
                log = (self.data_dir / "worker.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"job {job_id} still {job['state']} after {timeout:.0f} s\n{log}")
            time.sleep(0.25)

    def user_token(self, name: str, team: str) -> str:
        """A token of a new user `name` in `team`, made through the database as an admin would."""
        from jobs.auth import create_token, create_user
        from jobs.db import session_scope

        with session_scope(f"sqlite:///{self.data_dir / 'hmkd.db'}") as session:
            user = create_user(session, name=name, team_name=team)
            token, _ = create_token(session, user, name="browser-test")
        return token


def _wait_ready(
    proc: subprocess.Popen[bytes], url: str, log: Path, what: Callable[[], bool]
) -> None:
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            pytest.fail(f"hmkd serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if what():
                return
        if time.monotonic() > deadline:
            pytest.fail(f"hmkd serve at {url} not ready in 90 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def live_service(
    tmp_path_factory: pytest.TempPathFactory, tiny_digits: dict[str, Path]
) -> Iterator[LiveService]:
    """`hmkd serve` as a user runs it, with fast progress writes; stopped (and its worker with
    it) at the end of the module."""
    data = tmp_path_factory.mktemp("dashboard-service")
    src = Path(os.path.commonpath([str(p) for p in tiny_digits.values()]))
    dst = data / "datasets" / "digits"
    shutil.copytree(src, dst)
    digits = {k: dst / Path(v).relative_to(src) for k, v in tiny_digits.items()}
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMKD_")} | {
        "HMKD_DATA_DIR": str(data),
        "HMKD_PROGRESS_INTERVAL_SECONDS": "0.2",
        "HMKD_HEARTBEAT_SECONDS": "1",
        "HMKD_SWEEP_SECONDS": "1",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    log = data / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from client.service_cli import app; app()", "serve",
             "--port", str(port)],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, log, lambda: httpx.get(f"{url}/v1/ready").status_code == 200)
        service = LiveService(url, (data / "token").read_text().strip(), data, digits)
        with service.client() as c:
            _wait_ready(proc, url, log, lambda: bool(c.get("/v1/queue").json()["workers"]))
        yield service
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group we started it in
            proc.wait()


@pytest.fixture(scope="module")
def finished_jobs(live_service: LiveService) -> dict[str, str]:
    """A plain training job and an HMKD distillation from it, both succeeded, plus a long job
    queued behind them for the cancel test. 20 iterations with two evaluations each."""
    service = live_service
    if "teacher" not in service.jobs:
        short = {"schedule": {"iterations": 20}, "eval": {"every": 10}}
        teacher = service.submit("tiny-baseline", **short)
        service.jobs["teacher"] = teacher
        service.wait(teacher, TERMINAL, 120)
        service.jobs["hmkd"] = service.submit(
            "tiny-hmkd",
            kind="distill",
            teacher=tiny_model(weights=f"job:{teacher}"),
            distill={"method": "hmkd"},
            **short,
        )
        service.jobs["long"] = service.submit(
            "tiny-long", schedule={"iterations": 5000}, data={"val": None}
        )
        for role in ("teacher", "hmkd"):
            job = service.wait(service.jobs[role], TERMINAL, 120)
            assert job["state"] == "succeeded", job["error"]
    return service.jobs


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, live_service: LiveService) -> Iterator[Any]:
    """A fresh tab (own storage) that records console errors and every URL it requests."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    tab = context.new_page()
    tab.set_default_timeout(20_000)
    tab.errors = []
    tab.urls = []
    tab.on("console", lambda m: tab.errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: tab.errors.append(str(e)))
    tab.on("request", lambda r: tab.urls.append(r.url))
    yield tab
    context.close()


def sign_in(page: Any, service: LiveService, token: str | None = None) -> None:
    page.goto(f"{service.url}/")
    page.fill("#token", token or service.token)
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#signout", state="visible")
