"""`python -m bench.chaos`: break a running team deployment on purpose and prove nothing is lost.

It starts, on this machine and on loopback only, the team layout: a scratch PostgreSQL
database, a Redis database, the API and several workers (one of them reaching Redis through a
local relay that can cut its connections). It submits small training jobs and, while they run,
injects faults in turn:

- `sigkill`: SIGKILL a busy worker's whole process group (node loss, OOM of the worker);
- `sigterm`: SIGTERM a busy worker, SIGKILL after a grace period (a rolling restart);
- `freeze`: SIGSTOP a job's training process, SIGKILL its worker but not the frozen process,
  wait until another worker has claimed the job, then SIGCONT the stale process;
- `broker`: cut the relayed worker's Redis connections for longer than a lease;
- `api`: SIGKILL the API while a submit is in flight, restart it and submit again with the
  same Idempotency-Key.

Killed workers and the API are restarted. At the end it checks, from the database and the
artifact store: every job reached a terminal state; none was lost (every one succeeded); none
ran twice; no attempt's write (progress, evaluation, artifact) landed after a later attempt
had claimed the job; every `student.pt` loads with `weights_only=True` and matches its
registered sha256; a resubmitted key made one job. It prints the faults survived, iterations
lost per kill and kill-to-resume seconds, and writes them as Markdown (`--out`) and JSON.

    python -m bench.chaos --faults 20 --out docs/reliability.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
FAULTS = ("sigkill", "freeze", "broker", "sigterm", "api")
HOST = "chaos"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BrokerRelay:
    """A TCP relay in front of Redis for one worker; `cut` drops every connection through it
    and refuses new ones for a while, as a network partition would."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.down_until = 0.0
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if time.monotonic() < self.down_until:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def cut(self, seconds: float) -> None:
        self.down_until = time.monotonic() + seconds
        with self.lock:
            doomed, self.open = self.open, []
        for s in doomed:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()
        self.cut(0)


def descendants(pid: int) -> list[int]:
    """Children of `pid`, recursively, nearest first (Linux /proc)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                for child in map(int, f.read().split()):
                    found += [child, *descendants(child)]
    return found


def signal_quietly(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


@contextlib.contextmanager
def scratch_database(server_url: str, prefix: str = "hmkd_chaos") -> Iterator[str]:
    """A new PostgreSQL database on the server of `server_url`, dropped afterwards (with the
    connections still open to it). The test fixtures use it too."""
    from sqlalchemy import create_engine, make_url, pool, text

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    from jobs.db import dispose_engines

    admin = create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
        finally:
            dispose_engines()
            with admin.connect() as conn:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                )
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        admin.dispose()


@dataclass
class Fault:
    kind: str
    at: datetime  # wall clock, UTC, as the database records events
    worker: str | None = None
    job_id: str | None = None
    note: str = ""


@dataclass
class Deployment:
    """The API and the workers as child processes, each restartable."""

    work: Path
    env: dict[str, str]
    relay: BrokerRelay
    relayed_worker: str
    api_port: int = 0
    api: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start_api(self) -> None:
        self.api_port = self.api_port or free_port()
        code = (
            "import uvicorn; from api.app import create_app; from jobs.settings import Settings; "
            f"uvicorn.run(create_app(Settings()), host='127.0.0.1', port={self.api_port}, "
            "log_level='warning')"
        )
        log = open(self.work / "api.log", "ab")  # noqa: SIM115 (the process keeps it)
        self.api = subprocess.Popen(
            [sys.executable, "-c", code], env=self.env, stdout=log, stderr=log, cwd=REPO
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise SystemExit(f"the API did not start; see {self.work / 'api.log'}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def kill_api(self) -> None:
        assert self.api is not None
        self.api.kill()
        self.api.wait()

    def start_worker(self, name: str) -> None:
        from worker.cli import worker_argv

        env = dict(self.env)
        if name == self.relayed_worker:
            env["HMKD_BROKER_URL"] = env["HMKD_BROKER_URL"].replace(
                env["CHAOS_REDIS_HOSTPORT"], f"127.0.0.1:{self.relay.port}"
            )
        argv = worker_argv([env["HMKD_DEFAULT_QUEUE"]], hostname=f"{name}@{HOST}")
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115
        self.workers[name] = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", *argv],
            env=env,
            stdout=log,
            stderr=log,
            cwd=REPO,
            start_new_session=True,
        )
        log.close()

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.workers[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait()

    def stop_all(self) -> None:
        for name, proc in self.workers.items():
            if proc.poll() is None:
                self.kill_worker(name)
        if self.api is not None and self.api.poll() is None:
            self.kill_api()


class Chaos:
    """Submits the jobs, injects the faults, restarts what was killed."""

    def __init__(self, args: argparse.Namespace, dep: Deployment, token: str, spec: dict) -> None:
        self.args, self.dep, self.spec = args, dep, spec
        self.headers = {"Authorization": f"Bearer {token}"}
        self.faults: list[Fault] = []
        self.job_ids: list[str] = []
        self.resubmitted: list[str] = []  # idempotency keys sent twice around an API kill
        self.stale_pids: list[int] = []
        self.rng = random.Random(args.seed)
        self.url = dep.env["HMKD_DATABASE_URL"]

    # ---- jobs ------------------------------------------------------------------------------
    def submit(self, name: str, key: str, timeout: float = 30) -> str | None:
        body = {"name": name, **self.spec}
        headers = {**self.headers, "Idempotency-Key": key}
        res = httpx.post(f"{self.dep.url}/v1/jobs", json=body, headers=headers, timeout=timeout)
        if res.status_code not in (200, 201):
            raise SystemExit(f"submit {name}: {res.status_code} {res.text[:300]}")
        return str(res.json()["id"])

    def busy_workers(self) -> dict[str, str]:
        """worker name -> the job it runs now."""
        from sqlalchemy import select

        from jobs.db import session_scope
        from jobs.models import Job, JobState

        with session_scope(self.url) as s:
            rows = s.execute(
                select(Job.lease_owner, Job.id).where(Job.state == JobState.running.value)
            ).all()
        busy = {}
        for owner, job_id in rows:
            name = (owner or "").split("@", 1)[0]
            if name in self.dep.workers and self.dep.workers[name].poll() is None:
                busy[name] = job_id
        return busy

    def attempt_of(self, job_id: str) -> int:
        from jobs.db import session_scope
        from jobs.models import Job

        with session_scope(self.url) as s:
            job = s.get(Job, job_id)
            return job.attempt if job is not None else 0

    def unfinished(self) -> int:
        from sqlalchemy import func, select

        from jobs.db import session_scope
        from jobs.models import TERMINAL, Job

        with session_scope(self.url) as s:
            return int(
                s.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.state.not_in([t.value for t in TERMINAL]))
                )
                or 0
            )

    # ---- faults ----------------------------------------------------------------------------
    def _pick_busy(self) -> tuple[str, str] | None:
        busy = self.busy_workers()
        if not busy:
            return None
        name = self.rng.choice(sorted(busy))
        return name, busy[name]

    def inject(self, kind: str) -> Fault | None:
        """One fault of `kind`; None when nothing fit (no busy worker right now)."""
        now = datetime.now(UTC)
        if kind == "api":
            return self._api_mid_submit(now)
        if kind == "broker":
            self.dep.relay.cut(self.args.lease * 1.5)
            return Fault("broker", now, self.dep.relayed_worker, note="connections cut")
        picked = self._pick_busy()
        if picked is None:
            return None
        name, job_id = picked
        if kind == "sigkill":
            self.dep.kill_worker(name, signal.SIGKILL)
        elif kind == "sigterm":
            self.dep.workers[name].send_signal(signal.SIGTERM)
            try:
                self.dep.workers[name].wait(self.args.lease)
            except subprocess.TimeoutExpired:
                self.dep.kill_worker(name, signal.SIGKILL)
        elif kind == "freeze":
            return self._freeze(now, name, job_id)
        self._restart_later(name)
        return Fault(kind, now, name, job_id)

    def _freeze(self, now: datetime, name: str, job_id: str) -> Fault | None:
        main = self.dep.workers[name]
        family = descendants(main.pid)
        if len(family) < 2:
            return None  # the training process has not started yet
        training = family[1]  # main -> pool process -> training process
        attempt = self.attempt_of(job_id)
        signal_quietly(training, signal.SIGSTOP)
        for pid in (main.pid, family[0]):  # the worker dies; its frozen training stays
            signal_quietly(pid, signal.SIGKILL)
        main.wait()
        self.stale_pids.append(training)
        self._restart_later(name)
        # the job queues again once its lease runs out, behind the jobs already waiting
        deadline = time.monotonic() + self.args.freeze_wait
        while time.monotonic() < deadline and self.attempt_of(job_id) == attempt:
            time.sleep(0.5)
        taken = self.attempt_of(job_id) > attempt
        signal_quietly(training, signal.SIGCONT)
        note = "claimed again, then the stale process resumed" if taken else "not reclaimed"
        return Fault("freeze", now, name, job_id, note)

    def _api_mid_submit(self, now: datetime) -> Fault:
        key = f"chaos-{uuid.uuid4().hex[:12]}"
        name = f"chaos-api-{len(self.resubmitted)}"

        def send() -> None:
            with contextlib.suppress(httpx.HTTPError, SystemExit):
                self.submit(name, key, timeout=10)

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(self.rng.uniform(0.0, 0.05))
        self.dep.kill_api()
        sender.join()
        self.dep.start_api()
        job_id = self.submit(name, key)  # the client's retry, same key
        assert job_id is not None
        if job_id not in self.job_ids:
            self.job_ids.append(job_id)
        self.resubmitted.append(key)
        return Fault("api", now, None, job_id, note="killed mid-submit, resubmitted")

    def _restart_later(self, name: str) -> None:
        def restart() -> None:
            time.sleep(self.rng.uniform(0.5, 2.0))
            self.dep.start_worker(name)

        threading.Thread(target=restart, daemon=True).start()

    def run(self) -> None:
        for k in range(self.args.jobs):
            job_id = self.submit(f"chaos-{k}", f"chaos-initial-{k}")
            assert job_id is not None
            self.job_ids.append(job_id)
        started = time.monotonic()
        kinds = list(FAULTS)
        while len(self.faults) < self.args.faults:
            if time.monotonic() - started > self.args.max_minutes * 60:
                print("[chaos] time is up before every fault was injected", flush=True)
                break
            if self.unfinished() == 0:  # keep something to break
                k = len(self.job_ids)
                self.job_ids.append(self.submit(f"chaos-{k}", f"chaos-more-{k}") or "")
            time.sleep(self.rng.uniform(*self.args.gap))
            kind = kinds[len(self.faults) % len(kinds)]
            fault = self.inject(kind)
            if fault is None:
                continue
            self.faults.append(fault)
            print(
                f"[chaos] fault {len(self.faults):2d} {fault.kind:8s} "
                f"{fault.worker or '':4s} {fault.job_id or '':32s} {fault.note}",
                flush=True,
            )
        deadline = time.monotonic() + self.args.drain_minutes * 60
        while self.unfinished() and time.monotonic() < deadline:
            for name, proc in list(self.dep.workers.items()):
                if proc.poll() is not None:  # a restart that did not take: try again
                    self.dep.start_worker(name)
            time.sleep(2)
        for pid in self.stale_pids:
            signal_quietly(pid, signal.SIGKILL)


def check(chaos: Chaos, artifacts: Path) -> dict[str, Any]:
    """What the database and the artifact store say after the run."""
    import torch
    from sqlalchemy import func, select

    from jobs.artifacts import file_sha256
    from jobs.db import session_scope
    from jobs.models import TERMINAL, Artifact, Job, JobEvent, MetricPoint

    terminal = {t.value for t in TERMINAL}
    report: dict[str, Any] = {"jobs": len(chaos.job_ids), "faults": len(chaos.faults)}
    lost, unfinished, twice, late_writes, bad_students = [], [], [], [], []
    lost_iterations: list[int] = []
    resume_s: list[float] = []
    with session_scope(chaos.url) as s:
        for job_id in chaos.job_ids:
            job = s.get(Job, job_id)
            assert job is not None
            if job.state not in terminal:
                unfinished.append(job_id)
            if job.state != "succeeded":
                last = s.scalar(
                    select(func.max(MetricPoint.created_at)).where(MetricPoint.job_id == job_id)
                )
                age = f"{(datetime.now(UTC) - last).total_seconds():.0f} s ago" if last else "never"
                lost.append(
                    f"{job_id} {job.state} at iteration {job.iteration}, attempt {job.attempt}, "
                    f"last progress {age}: {job.error or ''}"[:300]
                )
            events = s.execute(
                select(JobEvent.kind, JobEvent.attempt, JobEvent.created_at)
                .where(JobEvent.job_id == job_id)
                .order_by(JobEvent.id)
            ).all()
            if sum(1 for e in events if e.kind == "succeeded") > 1:
                twice.append(job_id)
            claimed = {e.attempt: e.created_at for e in events if e.kind == "claimed"}
            points = s.execute(
                select(MetricPoint.attempt, MetricPoint.iteration, MetricPoint.created_at).where(
                    MetricPoint.job_id == job_id
                )
            ).all()
            for a in sorted(claimed):
                later = [t for b, t in claimed.items() if b > a]
                if later:
                    cutoff = min(later)
                    late_writes += [
                        f"{job_id} attempt {a} iteration {p.iteration}"
                        for p in points
                        if p.attempt == a and p.created_at > cutoff
                    ]
                mine = [p.iteration for p in points if p.attempt == a]
                nxt = [p.iteration for p in points if p.attempt == a + 1]
                if mine and nxt:
                    lost_iterations.append(max(mine) - (min(nxt) - 1))
            for fault in chaos.faults:
                if fault.job_id != job_id or fault.kind == "api":
                    continue
                after = [t for t in claimed.values() if t > fault.at]
                if after:
                    resume_s.append((min(after) - fault.at).total_seconds())
            if job.state == "succeeded":
                row = s.scalar(
                    select(Artifact).where(
                        Artifact.job_id == job_id, Artifact.name == "run/student.pt"
                    )
                )
                path = artifacts / job_id / "run" / "student.pt"
                try:
                    torch.load(path, map_location="cpu", weights_only=True)
                    ok = row is not None and file_sha256(path) == row.sha256
                except Exception as err:
                    ok = False
                    bad_students.append(f"{job_id}: {err}")
                if not ok and not any(b.startswith(job_id) for b in bad_students):
                    bad_students.append(f"{job_id}: sha256 differs from its registered one")
        resubmits = {
            key: int(
                s.scalar(select(func.count()).select_from(Job).where(Job.idempotency_key == key))
                or 0
            )
            for key in chaos.resubmitted
        }
        attempts = [int(a) for a in s.scalars(select(Job.attempt).where(Job.id.in_(chaos.job_ids)))]
    by_kind: dict[str, int] = {}
    for fault in chaos.faults:
        by_kind[fault.kind] = by_kind.get(fault.kind, 0) + 1
    report.update(
        {
            "faults_by_kind": by_kind,
            "jobs_not_terminal": len(unfinished),
            "jobs_lost": len(lost),
            "lost": lost,
            "jobs_run_twice": len(twice),
            "writes_after_a_newer_claim": len(late_writes),
            "late_writes": late_writes[:20],
            "students_bad": bad_students,
            "resubmitted_keys": len(resubmits),
            "duplicate_jobs_from_resubmits": sum(n - 1 for n in resubmits.values() if n > 1),
            "attempts": {"total": sum(attempts), "max": max(attempts, default=0)},
            "iterations_lost_per_kill": _summary(lost_iterations),
            "kill_to_resume_s": _summary(resume_s),
        }
    )
    return report


def _summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "median": None, "max": None}
    return {"n": len(values), "median": statistics.median(values), "max": max(values)}


def passed(report: dict[str, Any]) -> bool:
    return (
        report["jobs_not_terminal"] == 0
        and report["jobs_lost"] == 0
        and report["jobs_run_twice"] == 0
        and report["writes_after_a_newer_claim"] == 0
        and not report["students_bad"]
        and report["duplicate_jobs_from_resubmits"] == 0
    )


def markdown(report: dict[str, Any], args: argparse.Namespace, faults: list[Fault]) -> str:
    it, rs = report["iterations_lost_per_kill"], report["kill_to_resume_s"]

    def fmt(v: float | None, spec: str = ".1f") -> str:
        return "–" if v is None else format(v, spec)

    lines = [
        "# Reliability: a chaos run",
        "",
        "`python -m bench.chaos` starts the team layout on one machine, loopback only: a scratch",
        "PostgreSQL database, Redis, the API and several workers, one of them reaching Redis",
        "through a relay that can cut its connections. While small training jobs run it injects,",
        "in turn: SIGKILL of a busy worker's process group (`sigkill`); SIGSTOP of a job's",
        "training process, SIGKILL of its worker only, SIGCONT once another worker has claimed",
        "the job (`freeze`); a cut of the relayed worker's broker connections for 1.5 leases",
        "(`broker`); SIGTERM of a busy worker, SIGKILL after one lease (`sigterm`); SIGKILL of",
        "the API during a submit, then the same submit again with its Idempotency-Key (`api`).",
        "Killed processes are restarted. It then checks, from the database and the artifact",
        "store, what the table below reports, and exits non-zero when a must-be-0 line is not.",
        "",
        "Iterations lost per re-claim: the last iteration an attempt reported minus the one the",
        "next attempt resumed from (checkpoints every 10 iterations). Fault to new claim: from",
        "the fault to the next attempt's claim of the job it hit; it is bounded below by the",
        "lease (a dead worker is only known by its lease running out).",
        "",
        f"- Command: `python -m bench.chaos --jobs {args.jobs} --workers {args.workers} "
        f"--faults {args.faults} --iterations {args.iterations} --lease {args.lease:g} "
        f"--drain-minutes {args.drain_minutes:g} --seed {args.seed}`",
        f"- Verdict: **{'passed' if passed(report) else 'FAILED'}**",
        "",
        "| measure | value |",
        "|---|---|",
        f"| faults survived | {report['faults']} "
        + "("
        + ", ".join(f"{k} {v}" for k, v in sorted(report["faults_by_kind"].items()))
        + ") |",
        f"| jobs | {report['jobs']} |",
        f"| jobs not in a terminal state (must be 0) | {report['jobs_not_terminal']} |",
        f"| jobs lost (must be 0) | {report['jobs_lost']} |",
        f"| jobs run twice (must be 0) | {report['jobs_run_twice']} |",
        f"| writes of an attempt after a newer claim (must be 0) | "
        f"{report['writes_after_a_newer_claim']} |",
        f"| students that fail to load or differ from their sha256 (must be 0) | "
        f"{len(report['students_bad'])} |",
        f"| submits repeated around an API kill / duplicate jobs | "
        f"{report['resubmitted_keys']} / {report['duplicate_jobs_from_resubmits']} |",
        f"| attempts over all jobs (most for one job) | {report['attempts']['total']} "
        f"({report['attempts']['max']}) |",
        f"| iterations lost per re-claim: median / max (n) | {fmt(it['median'], 'g')} / "
        f"{fmt(it['max'], 'g')} ({it['n']}) |",
        f"| fault to new claim, s: median / max (n) | {fmt(rs['median'])} / {fmt(rs['max'])} "
        f"({rs['n']}) |",
        "",
        "| # | fault | worker | job | note |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {f.kind} | {f.worker or ''} | {(f.job_id or '')[:10]} | {f.note} |"
        for k, f in enumerate(faults, 1)
    ]
    return "\n".join(lines) + "\n"


def _tiny_data(root: Path) -> dict[str, str]:
    from hmkd_core.data import make_small_digits

    paths = make_small_digits(root, train=8, val=4, size=64, seed=0, min_digits=2, max_digits=3)
    return {k: str(v) for k, v in paths.items()}


def job_spec(paths: dict[str, str], iterations: int) -> dict[str, Any]:
    return {
        "data": {
            "train": {"images": paths["train_images"], "annotations": paths["train_annotations"]},
            "val": {"images": paths["val_images"], "annotations": paths["val_annotations"]},
        },
        "student": {
            "backbone": "resnet18",
            "fpn_channels": 16,
            "min_size": 64,
            "max_size": 64,
            "anchor_sizes": [8, 16, 32, 64, 128],
        },
        "schedule": {"iterations": iterations, "batch_size": 2, "lr": 0.01, "warmup_iters": 2},
        "eval": {"every": 0, "batch_size": 4},
        "checkpoint": {"every": 10},
        "runtime": {"seed": 0, "log_every": 1, "device": "cpu"},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--database-url",
        default=os.environ.get(
            "HMKD_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
        help="a PostgreSQL server (a scratch database is made there and dropped)",
    )
    p.add_argument("--redis", default="127.0.0.1:6379", help="host:port of Redis")
    p.add_argument("--redis-db", type=int, default=13, help="emptied at the start")
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--faults", type=int, default=20)
    p.add_argument("--iterations", type=int, default=150, help="per job")
    p.add_argument("--lease", type=float, default=8.0, help="lease seconds")
    p.add_argument("--gap", type=float, nargs=2, default=(3.0, 6.0), help="s between faults")
    p.add_argument("--max-minutes", type=float, default=25.0, help="for injecting faults")
    p.add_argument(
        "--freeze-wait", type=float, default=300.0, help="s a frozen job may wait to be reclaimed"
    )
    p.add_argument("--drain-minutes", type=float, default=10.0, help="for jobs to end after")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    p.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    if args.workers < 2:
        p.error("--workers must be at least 2: a job needs somewhere to resume")

    import redis

    host, port = args.redis.rsplit(":", 1)
    redis.Redis(host=host, port=int(port), db=args.redis_db).flushdb()
    work = Path(tempfile.mkdtemp(prefix="hmkd-chaos-"))
    relay = BrokerRelay(host, int(port))
    with scratch_database(args.database_url) as db_url:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "HMKD_DATABASE_URL": db_url,
            "HMKD_BROKER_URL": f"redis://{args.redis}/{args.redis_db}",
            "CHAOS_REDIS_HOSTPORT": args.redis,
            "HMKD_DATA_DIR": str(work),
            "HMKD_DATASET_ROOTS": json.dumps([str(work / "datasets")]),
            "HMKD_DEFAULT_QUEUE": "chaos",
            "HMKD_LEASE_SECONDS": str(args.lease),
            "HMKD_HEARTBEAT_SECONDS": "1",
            "HMKD_SWEEP_SECONDS": "2",
            "HMKD_REDISPATCH_SECONDS": str(args.lease * 3),
            "HMKD_MAX_ATTEMPTS": "50",
            "HMKD_PROGRESS_INTERVAL_SECONDS": "0.2",
            "OMP_NUM_THREADS": "1",
        }
        from jobs.admin import create_user, db_upgrade
        from jobs.settings import Settings

        settings = Settings(database_url=db_url, data_dir=work)  # this process's environment
        # stays as it was: the deployment's settings reach the children through `env` only
        db_upgrade(settings)
        token = create_user(settings, "chaos", team="chaos").token
        paths = _tiny_data(work / "datasets" / "digits")
        dep = Deployment(work, env, relay, relayed_worker="w0")
        try:
            dep.start_api()
            for k in range(args.workers):
                dep.start_worker(f"w{k}")
            chaos = Chaos(args, dep, token, job_spec(paths, args.iterations))
            chaos.run()
            report = check(chaos, work / "artifacts")
        finally:
            dep.stop_all()
            relay.close()
    text = markdown(report, args, chaos.faults)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    if args.keep:
        print(f"[chaos] work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if passed(report) else 1


if __name__ == "__main__":
    sys.exit(main())
