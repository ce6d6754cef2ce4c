"""Fixtures for worker tests: a dataset under the service's roots, jobs, and REAL worker
processes (`python -m celery -A worker.celery_app worker`), never eager Celery."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs.db import session_scope
from jobs.lifecycle import submit_job
from jobs.models import Job, User
from jobs.schemas import JobSpec
from jobs.settings import Settings
from tests.conftest import tiny_spec_dict

REPO = Path(__file__).resolve().parents[2]


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment that points a worker process at the test's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMKD_")}
    env.update(
        {
            "HMKD_DATA_DIR": str(settings.data_dir),
            "HMKD_DATABASE_URL": settings.database_url,
            "HMKD_BROKER_URL": settings.broker_url,
            "HMKD_ARTIFACTS_DIR": str(settings.artifacts_dir),
            "HMKD_DATASET_ROOTS": json.dumps([str(p) for p in settings.dataset_roots]),
            "HMKD_DEFAULT_QUEUE": settings.default_queue,
            "HMKD_LEASE_SECONDS": str(settings.lease_seconds),
            "HMKD_HEARTBEAT_SECONDS": str(settings.heartbeat_seconds),
            "HMKD_SWEEP_SECONDS": str(settings.sweep_seconds),
            "HMKD_PROGRESS_INTERVAL_SECONDS": str(settings.progress_interval_seconds),
            "HMKD_MAX_ATTEMPTS": str(settings.max_attempts),
            "HMKD_NODE_ADDRESS": settings.node_address,
            "HMKD_RENDEZVOUS_PORT": str(settings.rendezvous_port),
            "HMKD_RENDEZVOUS_TIMEOUT_S": str(settings.rendezvous_timeout_s),
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",  # tiny models; the test machine's cores are shared
        }
    )
    for name, value in (
        ("HMKD_STORAGE_URL", settings.storage_url),
        ("HMKD_S3_ENDPOINT_URL", settings.s3_endpoint_url),
        ("HMKD_S3_REGION", settings.s3_region),
    ):
        if value:
            env[name] = value
    return env


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll until `predicate()` is truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def job_row(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


@pytest.fixture
def digits(service_settings: Settings, tiny_digits: dict[str, Path]) -> dict[str, Path]:
    """The tiny SmallDigits set, copied under the service's dataset root."""
    src = Path(os.path.commonpath([str(p) for p in tiny_digits.values()]))
    dst = service_settings.dataset_roots[0] / "digits"
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return {k: dst / Path(v).relative_to(src) for k, v in tiny_digits.items()}


@pytest.fixture
def submit(
    service_settings: Settings, admin: tuple[User, str], digits: dict[str, Path]
) -> Callable[..., str]:
    """submit(name, **spec sections) -> job id: a queued, undispatched tiny job."""

    def _submit(name: str = "tiny", **sections: Any) -> str:
        spec = JobSpec.model_validate({"name": name, **tiny_spec_dict(digits, **sections)})
        with session_scope(service_settings.database_url) as session:
            user = session.get(User, admin[0].id)
            job, created = submit_job(session, user=user, spec=spec, settings=service_settings)
            assert created
            return job.id

    return _submit


class WorkerProcess:
    """A worker in its own process group (so a kill takes its pool and training child too),
    started as `celery -A worker.celery_app worker ...` or through `worker.cli.run_worker`."""

    def __init__(self, settings: Settings, hostname: str, log_dir: Path, via_cli: bool) -> None:
        from worker.cli import worker_argv

        self.hostname = hostname
        self.log_path = log_dir / f"worker-{hostname.split('@')[0]}.log"
        queue = settings.default_queue
        if via_cli:
            code = (
                f"from worker.cli import run_worker; run_worker([{queue!r}], hostname={hostname!r})"
            )
            cmd = [sys.executable, "-c", code]
        else:
            argv = worker_argv([queue], hostname=hostname)
            cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", *argv]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=worker_env(settings),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group: the worker, its pool and any training process."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_FAILED] = report.failed


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def start_worker(
    service_settings: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Any]]:
    """start_worker(name) -> WorkerProcess; every worker is killed at the end of the test,
    and a failed test prints the workers' and the jobs' logs."""
    started: list[WorkerProcess] = []

    def _start(name: str = "w1", *, via_cli: bool = False) -> WorkerProcess:
        worker = WorkerProcess(service_settings, f"{name}@test", tmp_path, via_cli)
        started.append(worker)
        return worker

    yield _start
    for worker in started:
        if worker.proc.poll() is None:
            worker.kill(signal.SIGKILL)
    if request.node.stash.get(_FAILED, False):
        for worker in started:
            print(f"\n----- {worker.log_path.name} (tail) -----\n{worker.log()[-6000:]}")
        for log in sorted(Path(service_settings.artifacts_dir).glob("*/logs.txt")):
            print(f"\n----- {log} (tail) -----\n{log.read_text(errors='replace')[-4000:]}")
