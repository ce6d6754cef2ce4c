"""`hmkd serve` on the embedded default, as a user starts it: a real process tree."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from client.sdk import Client

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_with(env_entry: bytes) -> list[int]:
    """Pids of processes whose environment holds `env_entry` (ours: the test's data dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if env_entry in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _kill_all_with(env_entry: bytes) -> None:
    for pid in _processes_with(env_entry):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop", "returncode"),
    [(signal.SIGINT, 0), (signal.SIGTERM, 128 + signal.SIGTERM)],
    ids=["ctrl-c", "sigterm"],
)
def test_serve_embedded_starts_api_and_worker_and_stops_both(
    tmp_path: Path, stop: signal.Signals, returncode: int
) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMKD_")} | {
        "HMKD_DATA_DIR": str(tmp_path),
        "PYTHONPATH": str(REPO),
    }
    serve = subprocess.Popen(
        [sys.executable, "-c", "from client.service_cli import app; app()", "serve",
         "--port", str(port)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    marker = f"HMKD_DATA_DIR={tmp_path}".encode()
    try:
        deadline = time.monotonic() + 60
        while True:
            assert serve.poll() is None, serve.stdout.read().decode() if serve.stdout else ""
            try:
                if httpx.get(f"{url}/v1/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "hmkd serve did not answer in 60 s"
            time.sleep(0.2)
        page = httpx.get(f"{url}/")  # the dashboard, no token needed for the page itself
        assert page.status_code == 200 and "HMKD dashboard" in page.text
        token = (tmp_path / "token").read_text().strip()
        assert (tmp_path / "api_url").read_text().strip() == url  # how the CLI finds it
        with Client(url, token) as client:  # the token `serve` wrote is the CLI's
            assert client.jobs()["items"] == []
            assert client.ready()["ready"] is True
            while not client.queue()["workers"]:  # the worker's heartbeat reached the db
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                time.sleep(0.3)
        assert (tmp_path / "datasets").is_dir()
    finally:
        serve.send_signal(stop)
        try:
            out, _ = serve.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            _kill_all_with(marker)  # a failed test leaves no service running behind it
            raise
    assert serve.returncode == returncode, out.decode()
    assert b"stopping the worker" in out
    assert not (tmp_path / "api_url").exists()  # a stopped service is not advertised
    assert f"dashboard {url}/ (sign in with the token in {tmp_path / 'token'})" in out.decode()
    assert _processes_with(marker) == []  # no worker (or pool child) left behind


def test_the_cli_finds_the_url_serve_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from client.sdk import default_base_url

    monkeypatch.delenv("HMKD_API_URL", raising=False)
    monkeypatch.setenv("HMKD_DATA_DIR", str(tmp_path))
    assert default_base_url() == "http://127.0.0.1:8000"
    (tmp_path / "api_url").write_text("http://127.0.0.1:8765\n")
    assert default_base_url() == "http://127.0.0.1:8765"
    monkeypatch.setenv("HMKD_API_URL", "http://elsewhere:9000")
    assert default_base_url() == "http://elsewhere:9000"
