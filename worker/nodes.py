"""Multi-node jobs on the worker side: the torchrun command, node 0's watch over its peers,
and the task a reserved peer runs (`hmkd.run_node`).

Every node starts `python -m torch.distributed.run` (torchrun) with the same c10d rendezvous
(node 0's host and port, the job id and attempt as its id), `--max-restarts 0`: restarting
the group is the service's decision, made with the lease and the attempts it counts, not
torchrun's. Node 0's torchrun hosts the rendezvous store (`is_host`). Each rank process is
`python -m worker.rank REQUEST`, which numbers ranks by node (node 0's first), so global rank
0, the only writer of checkpoints and artifacts, runs beside the worker that holds the lease.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from jobs.artifacts import store_of
from jobs.db import db_clock, session_scope
from jobs.gang import broken_nodes, fresh_s, gang_of, mark_node, unfinished_nodes
from jobs.lifecycle import is_held
from jobs.models import Job, JobNode
from jobs.progress import record_artifact
from jobs.settings import Settings, get_settings
from jobs.storage import storage_settings
from worker.celery_app import app
from worker.child import TrainRequest

log = logging.getLogger(__name__)

# how often node 0 looks at its peers, and a peer at the lease, while training runs
WATCH_S = 1.0


def node_address(settings: Settings) -> str:
    return settings.node_address or socket.getfqdn()


def rendezvous_port(settings: Settings) -> int:
    """The configured port when it is free on this host, else any free one."""
    for port in (settings.rendezvous_port, 0):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free port for the rendezvous")


def torchrun_command(
    request_path: Path,
    *,
    nodes: int,
    nproc: int,
    endpoint: str,
    run_id: str,
    is_host: bool,
    addr: str,
    join_s: float,
) -> list[str]:
    """The torchrun invocation of one node of a multi-node job."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={run_id}",
        f"--rdzv-conf=is_host={int(is_host)},join_timeout={int(join_s)}",
        f"--local-addr={addr}",
        "--max-restarts=0",
        "--monitor-interval=1",
        "-m",
        "worker.rank",
        str(request_path),
    ]


def procs_per_node(spec: dict[str, Any]) -> int:
    """A node's processes: its GPUs, or on the CPU the spec's `runtime.nproc`."""
    gpus = int((spec.get("resources") or {}).get("gpus") or 0)
    return gpus if gpus > 0 else int((spec.get("runtime") or {}).get("nproc") or 1)


def write_request(request: TrainRequest, job_dir: Path) -> Path:
    """The request as a hidden file of the job's folder (never listed as an artifact)."""
    path = job_dir / f".request-{request.attempt}-node{request.node_rank}.json"
    # readable by this user only: it holds the database's address and credentials
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(request.to_json())
    return path


class GangWatch:
    """What node 0 asks while it trains: has a peer been lost? (a reason, else None)."""

    def __init__(self, settings: Settings, job_id: str, attempt: int) -> None:
        self.settings = settings
        self.job_id = job_id
        self.attempt = attempt
        self._last = 0.0

    def __call__(self) -> str | None:
        if time.monotonic() - self._last < WATCH_S:
            return None
        self._last = time.monotonic()
        try:
            with session_scope(self.settings.database_url) as session:
                broken = broken_nodes(
                    session,
                    self.job_id,
                    self.attempt,
                    now=db_clock(session),
                    fresh_s=fresh_s(self.settings),
                    join_s=self.settings.rendezvous_timeout_s,
                )
        except Exception as err:  # a database blip is not a lost node
            log.warning("job %s: could not look at its nodes: %s", self.job_id, err)
            return None
        return "; ".join(broken) or None

    def after_failure(self, grace_s: float) -> str | None:
        """Once node 0's training failed: wait up to `grace_s` for the peers to end. A peer
        lost meanwhile (or still not ended) means the group broke, and it restarts; peers that
        all ended mean the failure is the training's own."""
        deadline = time.monotonic() + grace_s
        while True:
            self._last = 0.0
            reason = self()
            if reason:
                return reason
            with session_scope(self.settings.database_url) as session:
                left = unfinished_nodes(session, self.job_id, self.attempt)
                if not left:
                    return None
                names = ", ".join(f"node {n.rank} ({n.worker})" for n in left)
            if time.monotonic() > deadline:
                return f"{names} did not end with the group"
            time.sleep(0.5)


@app.task(name="hmkd.run_node", bind=True, acks_late=True, ignore_result=True)
def run_node(self: Any, job_id: str, attempt: int, rank: int) -> str:
    """Run node `rank` of attempt `attempt` of a multi-node job, on this reserved worker."""
    name = self.request.hostname or "worker"
    return execute_node(get_settings(), job_id, attempt, rank, name)


def execute_node(settings: Settings, job_id: str, attempt: int, rank: int, name: str) -> str:
    """The body of `hmkd.run_node`, callable without Celery; returns how the node ended."""
    with session_scope(settings.database_url) as session:
        node = session.get(JobNode, (job_id, rank))
        job = session.get(Job, job_id)
        if (
            node is None
            or job is None
            or node.attempt != attempt
            or node.worker != name
            or job.attempt != attempt
            or job.state != "running"
            or not mark_node(
                session,
                job_id,
                attempt,
                rank,
                "running",
                f"pid {os.getpid()}",
                only_from=("reserved",),
            )
        ):
            log.info(
                "node %d of job %s (attempt %d): stale message, ignored", rank, job_id, attempt
            )
            return "stale"
        leader = gang_of(session, job_id, attempt)[0]
        token, spec, nodes = job.lease_owner or "", job.resolved_spec or job.spec, job.nodes
        endpoint, resume = leader.endpoint, leader.resume_from
    store = store_of(settings)
    job_dir = store.job_dir(job_id)
    job_dir.mkdir(parents=True, exist_ok=True)
    log_name = f"node-{rank}.log"
    log_path = job_dir / log_name
    state, detail = "failed", "the node's training did not start"
    try:
        if resume:  # the checkpoint node 0 resumes from: every node starts from the same one
            store.fetch(job_id, resume)
        request = TrainRequest(
            job_id=job_id,
            spec=spec,
            run_dir=str(store.run_dir(job_id)),
            result_path=str(job_dir / f".result-{attempt}-node{rank}.json"),
            database_url=settings.database_url,
            worker=token,  # every node writes with the lease holder's fencing token
            attempt=attempt,
            job_dir=str(job_dir),
            throttle_seconds=settings.progress_interval_seconds,
            supervisor_pid=os.getpid(),
            checkpoint_dir=str(store.checkpoint_dir(job_id, attempt)),
            resume_from=str(store.resolve(job_id, resume)) if resume else None,
            storage=storage_settings(settings),
            node_rank=rank,
            nodes=nodes,
        )
        command = torchrun_command(
            write_request(request, job_dir),
            nodes=nodes,
            nproc=procs_per_node(spec),
            endpoint=str(endpoint),
            run_id=f"{job_id}-{attempt}",
            is_host=False,
            addr=node_address(settings),
            join_s=settings.rendezvous_timeout_s,
        )
        _node_line(log_path, f"node {rank} of {nodes}, attempt {attempt}, on {name}: {endpoint}")
        try:
            code = _run_while_held(settings, job_id, token, attempt, command, log_path)
        finally:
            Path(command[-1]).unlink(missing_ok=True)  # it holds the database's address
        state, detail = _ending(code)
    finally:
        _node_line(log_path, f"node {rank} {state}: {detail}")
        with session_scope(settings.database_url) as session:
            mark_node(session, job_id, attempt, rank, state, detail)
        if _register_log(settings, job_id, token, attempt, log_name) and not store.shared:
            log_path.unlink(missing_ok=True)  # scratch: the bucket has it
    log.info("node %d of job %s (attempt %d): %s %s", rank, job_id, attempt, state, detail)
    return state


def _run_while_held(
    settings: Settings, job_id: str, token: str, attempt: int, command: list[str], log_path: Path
) -> int | None:
    """Run this node's torchrun until it exits, or stop it once the attempt is over (the job
    ended, was requeued or restarted elsewhere): then its exit code is None."""
    from worker.tasks import _child_env, _terminate

    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=_child_env(), cwd=os.getcwd()
        )
    over_since: float | None = None
    while proc.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=WATCH_S)
        try:
            with session_scope(settings.database_url) as session:
                held = is_held(session, job_id, token, attempt)
        except Exception:  # the database may be briefly away; the lease has slack
            continue
        if not held:
            over_since = over_since or time.monotonic()
            if time.monotonic() - over_since > 5.0:  # the ranks end by themselves, mostly
                _terminate(proc)
                return None
    return proc.returncode


def _node_line(path: Path, message: str) -> None:
    from worker.tasks import _log_line

    with contextlib.suppress(OSError):
        _log_line(path, message)


def _ending(code: int | None) -> tuple[str, str]:
    if code is None:
        return "ended", "stopped: the attempt was over"
    if code == 0:
        return "ended", "exit 0"
    if code < 0:
        return "killed", f"torchrun killed by signal {-code}"
    return "failed", f"torchrun exited with {code}"


def _register_log(settings: Settings, job_id: str, token: str, attempt: int, name: str) -> bool:
    """Keep this node's log with the job's artifacts (published with object storage), while
    the attempt holds the job; whether it was."""
    store = store_of(settings)
    path = store.resolve(job_id, name)
    if not path.is_file():
        return False
    try:
        with session_scope(settings.database_url) as session:
            if not is_held(session, job_id, token, attempt):
                return False
        store.publish(job_id, name)
        with session_scope(settings.database_url) as session:
            return (
                record_artifact(
                    session,
                    job_id,
                    worker=token,
                    attempt=attempt,
                    name=name,
                    kind="logs",
                    path=path,
                )
                is not None
            )
    except Exception as err:  # the attempt may be over; the file stays on this disk
        log.warning("job %s: node log %s not registered: %s", job_id, name, err)
        return False
