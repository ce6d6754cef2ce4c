"""`hmkd serve`: the whole service from one command.

On the embedded default (SQLite) it migrates the database itself and writes a local admin
token to `<data_dir>/token`, where the CLI finds it; on a team database it only checks the
schema (migrating PostgreSQL is `hmkd db upgrade`, run once by whoever deploys). One worker
runs as a child process in its own session, so Ctrl-C reaches the API alone and the worker is
stopped (warm, then killed) on the way out; a job it leaves behind resumes on the next start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.markup import escape

from jobs.settings import Settings

WORKER_STOP_SECONDS = 10.0
API_URL_FILE = "api_url"  # in the data directory, while `hmkd serve` runs


class WorkerStartError(RuntimeError):
    """The embedded worker exited at once; its log says why."""


def worker_command(settings: Settings) -> list[str]:
    from worker.cli import worker_argv

    hostname = f"embedded@{socket.gethostname()}"
    argv = worker_argv([settings.default_queue], hostname=hostname)
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", *argv]


def start_worker(settings: Settings, log_path: Path) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """Start one worker on the default queue, its output appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - the worker writes to it for its whole life
    proc = subprocess.Popen(
        worker_command(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: Ctrl-C is ours to relay
        env=os.environ.copy(),
    )
    time.sleep(1.0)
    if proc.poll() is not None:
        log.close()
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise WorkerStartError(
            f"the worker exited with code {proc.returncode}; {log_path} ends with:\n"
            + "\n".join(tail)
        )
    return proc, log


def stop_worker(proc: subprocess.Popen[bytes], timeout: float = WORKER_STOP_SECONDS) -> None:
    """SIGTERM (Celery's warm shutdown); after `timeout` s, SIGKILL its whole process group,
    training children included. A job killed so resumes from its checkpoint later."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group we created for it, by its id
        proc.wait()


def run_service(
    *,
    host: str,
    port: int,
    data_dir: Path | None,
    with_worker: bool,
    console: Console,
) -> None:
    """Prepare the database and token, start the worker, serve the API until interrupted."""
    import uvicorn

    from api.app import create_app
    from jobs.auth import ensure_local_admin
    from jobs.migrate import check_current, display_url, upgrade

    if data_dir is not None:
        os.environ["HMKD_DATA_DIR"] = str(data_dir.expanduser().resolve())  # the worker too
    settings = Settings()
    if settings.embedded:
        upgrade(settings.database_url)
        for root in settings.dataset_roots:
            root.mkdir(parents=True, exist_ok=True)
        ensure_local_admin(settings)
        token_path = settings.data_dir / "token"
        console.print(escape(f"local admin token in {token_path} (the CLI reads it)"))
    else:
        check_current(settings.database_url)  # DatabaseNotMigrated: run `hmkd db upgrade`
    console.print(escape(f"database {display_url(settings.database_url)}"))
    console.print(escape(f"datasets must lie under {', '.join(map(str, settings.dataset_roots))}"))
    url = f"http://{host}:{port}"
    url_file = settings.data_dir / API_URL_FILE  # where the CLI on this machine looks
    url_file.parent.mkdir(parents=True, exist_ok=True)
    url_file.write_text(url + "\n")
    if url != settings.api_url:
        console.print(f"clients elsewhere: export HMKD_API_URL={url}")
    sign_in = (
        f"the token in {settings.data_dir / 'token'}"
        if settings.embedded
        else "an API token (`hmkd tokens create --user NAME`)"
    )
    # soft_wrap: a URL broken over two lines cannot be clicked or pasted
    console.print(escape(f"dashboard {url}/ (sign in with {sign_in})"), soft_wrap=True)
    proc = log = None
    if with_worker:
        log_path = settings.data_dir / "worker.log"
        proc, log = start_worker(settings, log_path)
        console.print(escape(f"worker on queue {settings.default_queue!r}, log in {log_path}"))
    # uvicorn shuts down on SIGTERM, then raises the signal again; with the default action that
    # would end this process at once, skipping `finally` and orphaning the worker. As an
    # exception it unwinds: `kill`, `docker stop` and systemd stop the worker too.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
    finally:
        if url_file.is_file() and url_file.read_text().strip() == url:
            url_file.unlink()  # a stopped service is found by nobody
        signal.signal(signal.SIGTERM, previous)
        if proc is not None:
            console.print("stopping the worker")
            stop_worker(proc)
        if log is not None:
            log.close()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
