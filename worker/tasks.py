"""The task `hmkd.run_job`: claim a job, keep its lease alive, run training, record the outcome.

The task is thin and idempotent. It claims the job first in line in the queue of the job its
message names (`claim_next`); a message that finds nothing to claim (a duplicate, a
redelivery, a job already finished or cancelled) is acknowledged and ignored. While training
runs in a separate process (see `worker.child`), a heartbeat thread renews the lease. If the
lease is lost (this worker was presumed dead and the job re-queued), training is stopped and
the job is left to its new owner.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from jobs.artifacts import ArtifactStore, store_of
from jobs.broker import dispatch_pending
from jobs.db import session_scope
from jobs.gang import fresh_s
from jobs.lifecycle import (
    add_event,
    claim_next,
    finish_job,
    hand_back,
    is_held,
    release_job,
    renew_lease,
    restart_group,
)
from jobs.models import Artifact, Job, JobState, Worker
from jobs.progress import (
    forget_missing_artifacts,
    latest_checkpoint,
    record_artifact,
    record_start,
)
from jobs.retention import apply_retention
from jobs.schemas import MAX_RUNTIME_STOP, PREEMPT_STOP
from jobs.settings import Settings, get_settings
from jobs.storage import storage_settings
from worker.celery_app import app
from worker.child import TrainRequest

log = logging.getLogger(__name__)

# After a lost lease, how long training may take to stop by itself before it is terminated.
LOST_LEASE_GRACE_S = 10.0
# Past resources.max_runtime_s, how long training may take to checkpoint and stop by itself.
OVERRUN_GRACE_S = 120.0


@app.task(name="hmkd.run_job", bind=True, acks_late=True, ignore_result=True)
def run_job(self: Any, job_id: str) -> str:
    """Run one job; returns what happened (`succeeded`, `duplicate`, `lease_lost`, ...)."""
    worker = f"{self.request.hostname or 'worker'}#{os.getpid()}"
    return execute_job(get_settings(), job_id, worker, worker_gpus=_gpu_count())


@functools.cache
def _gpu_count() -> int:
    """The GPUs this worker owns (what `hmkd worker` advertises in its heartbeat)."""
    from worker.celery_app import list_gpus

    return len(list_gpus())


def execute_job(
    settings: Settings, job_id: str, worker: str, worker_gpus: int | None = None
) -> str:
    """Claim and run, as `worker`, the job first in line in the queue of `job_id` (whose
    message was delivered; see `claim_next`) that fits in `worker_gpus` GPUs (None: any); the
    body of the task, callable without Celery."""
    with session_scope(settings.database_url) as session:
        if session.scalar(select(Worker.draining).where(Worker.name == worker.split("#")[0])):
            hand_back(session, job_id)  # shutting down: another worker gets the next publish
            return "draining"
        job = claim_next(
            session,
            job_id,
            worker=worker,
            lease_seconds=settings.lease_seconds,
            team_cap=settings.max_running_per_team,
            worker_gpus=worker_gpus,
            worker_fresh_s=fresh_s(settings),
        )
        if job is None:
            state = session.scalar(select(Job.state).where(Job.id == job_id))
            if state == JobState.queued:  # held back by its team's cap; published again later
                return "held"
            if state is not None:  # unknown ids (another deployment's message) leave no trace
                add_event(session, job_id, "delivery_ignored", f"by {worker}: job is {state}")
            log.info("job %s not claimable (%s): duplicate delivery, ignored", job_id, state)
            return "duplicate"
        job_id, spec, attempt = job.id, job.resolved_spec or job.spec, job.attempt
    try:
        return _run_claimed(settings, job_id, worker, spec, attempt)
    except Exception as err:
        # A fault of the worker itself, not of training: end the job with it rather than let
        # its lease expire and the same fault repeat on every attempt.
        log.exception("job %s: worker error", job_id)
        with contextlib.suppress(Exception), session_scope(settings.database_url) as session:
            finish_job(
                session,
                job_id,
                worker=worker,
                attempt=attempt,
                state=JobState.failed,
                error=f"the worker failed: {type(err).__name__}: {err}",
            )
        raise


def _run_claimed(
    settings: Settings, job_id: str, worker: str, spec: dict[str, Any], attempt: int
) -> str:
    store = store_of(settings)
    job_dir, run_dir = store.job_dir(job_id), store.run_dir(job_id)
    log_path = store.log_path(job_id)
    # the lease is renewed from the claim on: fetching from object storage can take longer
    heartbeat = LeaseHeartbeat(settings, job_id, worker, attempt)
    heartbeat.start()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        store.fetch(job_id, "logs.txt", refresh=True)  # earlier attempts', wherever they ran
        _log_line(log_path, f"attempt {attempt} claimed by {worker}")
        for line in fetch_weights(store, spec):
            _log_line(log_path, line)
        with session_scope(settings.database_url) as session:
            latest = latest_checkpoint(session, job_id, job_dir, store)
            # progress shows where this attempt starts, not where the last one stopped
            record_start(
                session,
                job_id,
                worker=worker,
                attempt=attempt,
                iteration=latest[1] if latest else 0,
            )
        if latest is not None:
            _log_line(log_path, f"resuming from {latest[0].relative_to(job_dir)}")
        for line in dataset_lines(spec):
            _log_line(log_path, line)
        nodes = int((spec.get("resources") or {}).get("nodes") or 1)
        request = TrainRequest(
            job_id=job_id,
            spec=spec,
            run_dir=str(run_dir),
            result_path=str(job_dir / f".result-{attempt}.json"),
            database_url=settings.database_url,
            worker=worker,
            attempt=attempt,
            job_dir=str(job_dir),
            throttle_seconds=settings.progress_interval_seconds,
            supervisor_pid=os.getpid(),
            checkpoint_dir=str(store.checkpoint_dir(job_id, attempt)),
            resume_from=str(latest[0]) if latest else None,
            storage=storage_settings(settings),
            nodes=nodes,
        )
        if nodes > 1:
            result = run_gang(settings, request, log_path, heartbeat)
        else:
            result = run_training(request, log_path, heartbeat)
        # still under the heartbeat: publishing the results can take longer than a lease
        outcome = record_outcome(
            settings, job_id, worker, attempt, job_dir, log_path, result, heartbeat
        )
    finally:
        heartbeat.stop()
    if not store.shared and _all_registered(settings, store, job_id):
        shutil.rmtree(job_dir, ignore_errors=True)  # scratch: the bucket has what is kept
    return outcome


def _all_registered(settings: Settings, store: ArtifactStore, job_id: str) -> bool:
    """Whether every file of the job's local folder is on record at its size (and so was
    published): only then may a scratch copy go."""
    with session_scope(settings.database_url) as session:
        sizes = dict(
            session.execute(
                select(Artifact.name, Artifact.size).where(Artifact.job_id == job_id)
            ).all()
        )
    return all(sizes.get(name) == path.stat().st_size for name, _, path in store.scan(job_id))


def fetch_weights(store: ArtifactStore, spec: dict[str, Any]) -> list[str]:
    """Download the weights the spec loads from another job's artifacts (a `job:<id>` teacher
    or student) when this machine does not have them; what it fetched, as log lines."""
    lines = []
    root = store.root.resolve()
    for model in ("teacher", "student"):
        weights = str((spec.get(model) or {}).get("weights") or "")
        if not weights.startswith("/"):
            continue
        path = Path(weights).resolve()
        if path.is_file() or not path.is_relative_to(root):
            continue
        job_id, *name = path.relative_to(root).parts
        if name and store.fetch(job_id, "/".join(name)):
            lines.append(f"{model}.weights fetched from job {job_id}'s storage")
    return lines


def dataset_lines(spec: dict[str, Any]) -> list[str]:
    """The job's splits as the log shows them: images, boxes per category, box sizes at the
    native and at the model's input size. A split that cannot be read says why; training
    reports the same error in full."""
    from jobs.data_check import summary_of

    student = spec.get("student") or {}
    input_size = (int(student.get("min_size", 800)), int(student.get("max_size", 1333)))
    lines = []
    for split, paths in (spec.get("data") or {}).items():
        if not isinstance(paths, dict) or "annotations" not in paths:
            continue
        try:
            s = summary_of(paths["images"], paths["annotations"], input_size)
        except Exception as err:  # the training process reports it properly
            lines.append(f"data.{split}: cannot summarise: {err}")
            continue
        per_category = ", ".join(f"{c.name} {c.boxes}" for c in s.categories)
        lines.append(
            f"data.{split}: {s.images} images ({s.images_without_boxes} without boxes), "
            f"{s.boxes} boxes: {per_category}"
        )
        lines.append(f"data.{split}: box sizes at native size {s.native_sizes}")
        lines.append(f"data.{split}: box sizes at the model's input {s.input_sizes}")
        lines.extend(s.warnings(split))
    return lines


def run_gang(
    settings: Settings, request: TrainRequest, log_path: Path, heartbeat: LeaseHeartbeat
) -> dict[str, Any]:
    """Node 0 of a multi-node job: serve the rendezvous, start the other nodes (their node
    tasks), run this node's torchrun, and watch the others while it runs. A lost node makes
    the result say `node_lost`: the group then restarts (`record_outcome`)."""
    from jobs.gang import gang_of, node_queue, set_endpoint
    from worker.nodes import (
        GangWatch,
        node_address,
        procs_per_node,
        rendezvous_port,
        torchrun_command,
        write_request,
    )

    job_id, attempt = request.job_id, request.attempt
    endpoint = f"{node_address(settings)}:{rendezvous_port(settings)}"
    job_dir = Path(request.job_dir)
    resume = Path(request.resume_from).relative_to(job_dir) if request.resume_from else None
    with session_scope(settings.database_url) as session:
        set_endpoint(session, job_id, attempt, endpoint, resume.as_posix() if resume else None)
        peers = [(n.rank, n.worker) for n in gang_of(session, job_id, attempt)[1:]]
    _log_line(
        log_path,
        f"node 0 of {request.nodes}, rendezvous {endpoint}; other nodes: "
        + ", ".join(f"{rank} on {name}" for rank, name in peers),
    )
    for rank, name in peers:
        try:
            app.send_task("hmkd.run_node", args=[job_id, attempt, rank], queue=node_queue(name))
        except Exception as err:  # the node never starts: the watch sees it and restarts
            log.warning("job %s: could not start node %d on %s: %s", job_id, rank, name, err)
    command = torchrun_command(
        write_request(request, job_dir),
        nodes=request.nodes,
        nproc=procs_per_node(request.spec),
        endpoint=endpoint,
        run_id=f"{job_id}-{attempt}",
        is_host=True,
        addr=node_address(settings),
        join_s=settings.rendezvous_timeout_s,
    )
    watch = GangWatch(settings, job_id, attempt)
    try:
        result = run_training(request, log_path, heartbeat, command=command, watch=watch)
    finally:
        Path(command[-1]).unlink(missing_ok=True)  # it holds the database's address
    # the others end with it (or already have); a node lost on the way restarts the group
    lost = result.get("node_lost") or watch.after_failure(fresh_s(settings) + 5.0)
    if lost and result.get("status") == "failed":
        result = {**result, "node_lost": lost}
    return result


def run_training(
    request: TrainRequest,
    log_path: Path,
    heartbeat: LeaseHeartbeat,
    *,
    command: list[str] | None = None,
    watch: Callable[[], str | None] | None = None,
) -> dict[str, Any]:
    """Start the training process (`python -m worker.child`, the request on its stdin; or
    `command`, which finds the request itself) and wait for it; returns its result dict.
    `watch`, asked while it runs, returns a reason to stop it (a lost node)."""
    result_path = Path(request.result_path)
    result_path.unlink(missing_ok=True)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            command or [sys.executable, "-m", "worker.child"],
            stdin=subprocess.PIPE if command is None else subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=os.getcwd(),
            env=_child_env(),
        )
    _log_line(log_path, f"training process pid {proc.pid}")
    if proc.stdin is not None:
        with proc.stdin:
            proc.stdin.write(request.to_json().encode())
    lost_at: float | None = None
    limit = (request.spec.get("resources") or {}).get("max_runtime_s")
    deadline = time.monotonic() + limit + OVERRUN_GRACE_S if limit else None
    while proc.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
        reason = watch() if watch is not None and not heartbeat.lost.is_set() else None
        if reason:
            log.warning("job %s: %s; stop this node, restart the group", request.job_id, reason)
            _log_line(log_path, f"a node was lost: {reason}")
            _terminate(proc)
            return {"status": "failed", "node_lost": reason, "error": reason, "iteration": None}
        if heartbeat.lost.is_set():  # training sees it too, through its reporter; give it time
            lost_at = lost_at or time.monotonic()
            if time.monotonic() - lost_at > LOST_LEASE_GRACE_S:
                log.warning("job %s: lease lost, training still running: stop it", request.job_id)
                _terminate(proc)
        elif deadline is not None and time.monotonic() > deadline:
            # training stops itself at the limit; one stuck where it cannot look is stopped
            log.warning("job %s: past max_runtime_s and still running: stop it", request.job_id)
            _terminate(proc)
            return {
                "status": "stopped",
                "iteration": None,
                "stop": f"{MAX_RUNTIME_STOP} ({limit} s), and did not stop by itself",
            }
    if result_path.is_file():
        result: dict[str, Any] = json.loads(result_path.read_text())
        result_path.unlink()
        return result
    return {"status": "failed", "error": _death_message(proc.returncode), "traceback": ""}


def _child_env() -> dict[str, str]:
    """The worker's environment, with the repo importable even when started from elsewhere."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """Stop the training process and every rank it spawned.

    The training process stays in the worker's process group, so a node-wide kill of the
    worker takes it down too; its DDP ranks are found through /proc instead.
    """
    family = [proc.pid, *_descendants(proc.pid)]
    _signal_all(family, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        _signal_all([proc.pid, *_descendants(proc.pid)], signal.SIGKILL)
        proc.wait(timeout=10)


def _descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (Linux /proc; empty elsewhere)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _death_message(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            sig = signal.Signals(-exitcode).name
        except ValueError:
            sig = f"signal {-exitcode}"
        hint = " (SIGKILL is often the out-of-memory killer)" if exitcode == -9 else ""
        return (
            f"the training process was killed by {sig}{hint}; its checkpoints are kept: "
            "retry the job to resume, with a smaller batch_size if memory ran out"
        )
    return f"the training process exited with code {exitcode} without reporting a result"


def record_outcome(
    settings: Settings,
    job_id: str,
    worker: str,
    attempt: int,
    job_dir: Path,
    log_path: Path,
    result: dict[str, Any],
    heartbeat: LeaseHeartbeat,
) -> str:
    """Register artifacts and end the job, unless another worker owns it by now."""
    status = result.get("status")
    with session_scope(settings.database_url) as session:
        row = session.execute(
            select(Job.lease_owner, Job.attempt, Job.cancel_requested, Job.state).where(
                Job.id == job_id
            )
        ).one_or_none()
    if row is None:
        log.warning("job %s was deleted while it ran", job_id)
        return "gone"
    if heartbeat.lost.is_set() or row.lease_owner != worker or row.attempt != attempt:
        _log_line(log_path, f"lease lost by {worker}; the job is left to its new owner")
        log.warning("job %s: lease lost; not finishing it", job_id)
        return "lease_lost"
    if result.get("node_lost"):
        register_artifacts(settings, job_id, job_dir, worker=worker, attempt=attempt)
        heartbeat.stop()
        with session_scope(settings.database_url) as session:
            state = restart_group(
                session, job_id, worker=worker, attempt=attempt, reason=str(result["node_lost"])
            )
        if state is None:
            return "lease_lost"
        _log_line(log_path, f"group restart: {result['node_lost']}; the job is {state.value}")
        dispatch_pending(settings)
        return "restarted" if state == JobState.queued else state.value
    if status == "succeeded":
        final, error = JobState.succeeded, None
    elif status == "stopped" and row.cancel_requested:
        final, error = JobState.cancelled, None
    elif status == "stopped" and str(result.get("stop") or "").startswith(MAX_RUNTIME_STOP):
        final = JobState.failed
        where = f"at iteration {result['iteration']}: " if result.get("iteration") else ""
        error = (
            f"stopped {where}{result['stop']}; its last checkpoint is kept, and a retry "
            "resumes from it with a new allowance"
        )
    elif status == "stopped" and str(result.get("stop") or "").startswith(PREEMPT_STOP):
        _log_line(log_path, f"preempted at iteration {result.get('iteration')}: back in the queue")
        register_artifacts(settings, job_id, job_dir, worker=worker, attempt=attempt)
        heartbeat.stop()
        with session_scope(settings.database_url) as session:
            released = release_job(
                session,
                job_id,
                worker=worker,
                attempt=attempt,
                iteration=int(result.get("iteration") or 0),
            )
        if not released:
            return "lease_lost"
        dispatch_pending(settings)
        return "preempted"
    elif status == "stopped":  # stopped for no reason we own: leave it to the lease protocol
        _log_line(log_path, f"training stopped ({result.get('stop')}); job left running")
        return "stopped"
    else:
        final = JobState.failed
        # the message only: the traceback, with the server's paths, is in the job's logs
        error = str(result.get("error") or "training failed")
        if result.get("traceback"):
            error += " (the traceback is in the job's logs)"
    _log_line(
        log_path, f"attempt ends {final.value}" + (f": {result.get('error')}" if error else "")
    )
    register_artifacts(settings, job_id, job_dir, worker=worker, attempt=attempt)
    heartbeat.stop()
    with session_scope(settings.database_url) as session:
        if not finish_job(
            session, job_id, worker=worker, attempt=attempt, state=final, error=error
        ):
            log.warning("job %s: lease lost before it could be finished", job_id)
            return "lease_lost"
    log.info("job %s: %s", job_id, final.value)
    if final == JobState.succeeded:
        with session_scope(settings.database_url) as session:
            job = session.get(Job, job_id)
            if job is not None:
                apply_retention(session, store_of(settings), job)
        dispatch_pending(settings)  # jobs that waited for it as their teacher: publish now
    return final.value


def register_artifacts(
    settings: Settings, job_id: str, job_dir: Path, *, worker: str, attempt: int
) -> None:
    """Record every file of the job (checkpoints, student, eval, logs) with size and sha256.

    Checkpoints the reporter registered as they were written are immutable and not hashed
    again (they can be gigabytes); a file registered unchanged (same size and sha256, such as
    a `best.pt` published when written) is not uploaded again; rows of pruned checkpoints are
    dropped. Nothing is uploaded once this attempt no longer holds the job.
    """
    store = store_of(settings)
    try:
        with session_scope(settings.database_url) as session:
            forget_missing_artifacts(session, job_id, store)
            known = {
                name: (size, sha)
                for name, size, sha in session.execute(
                    select(Artifact.name, Artifact.size, Artifact.sha256).where(
                        Artifact.job_id == job_id
                    )
                )
            }
    except Exception as err:  # storage or database away: the files stay, unregistered
        log.warning("job %s: artifacts not registered: %s", job_id, err)
        return
    for name, kind, path in store.scan(job_id):
        try:
            size = path.stat().st_size
            if kind == "checkpoint" and known.get(name, (None,))[0] == size:
                continue  # registered, and published, as it was written
            sha = store.sha256(path)
            if known.get(name) == (size, sha):
                continue
            with session_scope(settings.database_url) as session:
                if not is_held(session, job_id, worker, attempt):
                    log.warning("job %s: lease lost; %s not published", job_id, name)
                    return
            store.publish(job_id, name)
            with session_scope(settings.database_url) as session:
                record_artifact(
                    session,
                    job_id,
                    worker=worker,
                    attempt=attempt,
                    name=name,
                    kind=kind,
                    path=path,
                    sha256=sha,
                )
        except Exception as err:  # bookkeeping must not fail a run whose files are written
            log.warning("job %s: artifact %s not registered: %s", job_id, name, err)


@dataclass
class LeaseHeartbeat:
    """Renews the job's lease every `heartbeat_seconds` from a daemon thread."""

    settings: Settings
    job_id: str
    worker: str
    attempt: int
    lost: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name=f"lease-{self.job_id[:8]}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.heartbeat_seconds + 5)

    def _loop(self) -> None:
        while not self._done.wait(self.settings.heartbeat_seconds):
            try:
                with session_scope(self.settings.database_url) as session:
                    owned = renew_lease(
                        session,
                        self.job_id,
                        worker=self.worker,
                        attempt=self.attempt,
                        lease_seconds=self.settings.lease_seconds,
                    )
            except Exception as err:  # a missed beat is survivable; the lease has slack
                log.warning("job %s: lease renewal failed: %s", self.job_id, err)
                continue
            if not owned:
                log.warning("job %s: lease lost by %s", self.job_id, self.worker)
                self.lost.set()
                return


def _log_line(path: Path, message: str) -> None:
    """A line from the worker itself in the job's log, between the training's own lines."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{stamp} WORKER {message}\n")
