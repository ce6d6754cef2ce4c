"""Gangs: the workers one multi-node job runs on, reserved together or not at all.

A job with `resources.nodes: K` is claimed like any job, by the worker its message reached
(node 0, the lease holder, which hosts the rendezvous), and in the same transaction K-1 other
workers are reserved as nodes 1..K-1 (`job_nodes` rows): idle, alive, serving the job's queue,
not draining, each with the job's GPUs. If fewer are free, nothing is claimed or reserved and
the job keeps its place for the next turn, so two jobs never each hold half a gang and wait on
each other. Rows are locked in one order (a worker locks its own row when it claims, then its
peers' with SKIP LOCKED on PostgreSQL; SQLite serialises writers), so two claims never pick the
same idle worker. A reserved worker takes no other job; its node task (`hmkd.run_node`, on the
worker's own queue `hmkd-node.<name>`) starts its part of the torchrun group.

Every node writes with the lease holder's fencing token (its name and the attempt), so once
the attempt is over (the group restarts, the job is cancelled or requeued) none of them can
write for the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from jobs.models import Job, JobNode, JobState, Worker

NODE_QUEUE_PREFIX = "hmkd-node."
LIVE_NODE = ("reserved", "running")
# a node whose worker died, or whose training was killed, breaks the group: it restarts
BROKEN_NODE = ("lost", "killed")


def fresh_s(settings: Any) -> float:
    """How old a worker's heartbeat (written every sweep) may be before the worker counts as
    gone: three missed sweeps, and never under 10 s."""
    return max(3 * settings.sweep_seconds, 10.0)


def node_queue(worker_name: str) -> str:
    """The queue only the worker `worker_name` consumes: where its node tasks go."""
    return f"{NODE_QUEUE_PREFIX}{worker_name}"


def worker_of(lease_owner: str | None) -> str:
    """The worker's name (its Celery hostname) in a lease owner `name#pid`."""
    return (lease_owner or "").split("#")[0]


def lock_worker(session: Session, name: str) -> None:
    """Take this worker's row lock until the transaction ends: an UPDATE is a row lock on
    PostgreSQL and the write lock on SQLite, so a gang reserving this worker and this worker
    claiming a job of its own happen one after the other."""
    session.execute(
        update(Worker)
        .where(Worker.name == name)
        .values(heartbeat_at=Worker.heartbeat_at)
        .execution_options(synchronize_session=False)
    )


def reserved_for(session: Session, name: str) -> str | None:
    """The job a live gang has reserved the worker `name` for as one of its other nodes."""
    return session.scalar(
        select(JobNode.job_id)
        .join(Job, Job.id == JobNode.job_id)
        .where(
            JobNode.worker == name,
            JobNode.rank > 0,
            JobNode.attempt == Job.attempt,
            JobNode.state.in_(LIVE_NODE),
            Job.state == JobState.running.value,
        )
        .limit(1)
    )


def busy_workers(session: Session, now: datetime) -> set[str]:
    """Workers running a job on a live lease, or reserved as a node of one."""
    owners = session.scalars(
        select(Job.lease_owner).where(
            Job.state == JobState.running.value, Job.lease_expires_at >= now
        )
    )
    busy = {worker_of(owner) for owner in owners}
    busy.update(
        session.scalars(
            select(JobNode.worker)
            .join(Job, Job.id == JobNode.job_id)
            .where(
                JobNode.attempt == Job.attempt,
                JobNode.state.in_(LIVE_NODE),
                Job.state == JobState.running.value,
            )
        )
    )
    return busy


def reserve_peers(
    session: Session, job: Job, leader: str, *, now: datetime, fresh_s: float
) -> list[str] | None:
    """Lock `job.nodes - 1` free workers for the job, other than `leader`; None when there are
    not that many (nothing is then held). The caller records them with `record_gang` in the
    same transaction as its claim."""
    need = job.nodes - 1
    since = now - timedelta(seconds=fresh_s)
    candidates = [
        name
        for name, queues, gpus, draining in session.execute(
            select(Worker.name, Worker.queues, Worker.gpus, Worker.draining).where(
                Worker.heartbeat_at >= since
            )
        )
        if name != leader
        and job.queue in (queues or [])
        and not draining
        and len(gpus or []) >= job.gpus
    ]
    busy = busy_workers(session, now)
    free = sorted(name for name in candidates if name not in busy)
    if len(free) < need:
        return None
    # the rows of workers claiming a job of their own right now are skipped, not waited for
    locked = list(
        session.scalars(
            select(Worker.name)
            .where(Worker.name.in_(free))
            .order_by(Worker.name)
            .with_for_update(skip_locked=True)
        )
    )
    # what committed while we waited for the locks: a worker that took a job meanwhile
    chosen = [name for name in locked if name not in busy_workers(session, now)][:need]
    return chosen if len(chosen) == need else None


def record_gang(
    session: Session, job_id: str, attempt: int, leader: str, peers: Sequence[str]
) -> None:
    """The attempt's nodes: the leader as rank 0 (running), the peers as 1.. (reserved)."""
    session.execute(delete(JobNode).where(JobNode.job_id == job_id))
    for rank, name in enumerate([leader, *peers]):
        session.add(
            JobNode(
                job_id=job_id,
                rank=rank,
                attempt=attempt,
                worker=name,
                state="running" if rank == 0 else "reserved",
            )
        )
    session.flush()


def gang_of(session: Session, job_id: str, attempt: int) -> list[JobNode]:
    """The attempt's nodes, by rank."""
    return list(
        session.scalars(
            select(JobNode)
            .where(JobNode.job_id == job_id, JobNode.attempt == attempt)
            .order_by(JobNode.rank)
        )
    )


def mark_node(
    session: Session,
    job_id: str,
    attempt: int,
    rank: int,
    state: str,
    detail: str | None = None,
    *,
    only_from: Sequence[str] | None = None,
) -> bool:
    """Set a node's state (and endpoint or detail) if it still belongs to that attempt, and,
    with `only_from`, is in one of those states; False otherwise."""
    stmt = update(JobNode).where(
        JobNode.job_id == job_id, JobNode.rank == rank, JobNode.attempt == attempt
    )
    if only_from is not None:
        stmt = stmt.where(JobNode.state.in_(list(only_from)))
    result = session.execute(
        stmt.values(state=state, detail=detail).execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def set_endpoint(
    session: Session, job_id: str, attempt: int, endpoint: str, resume_from: str | None
) -> None:
    """Where the attempt's rendezvous is served (node 0's host:port), and the checkpoint all
    nodes resume from (an artifact name; None: from the start)."""
    session.execute(
        update(JobNode)
        .where(JobNode.job_id == job_id, JobNode.attempt == attempt, JobNode.rank == 0)
        .values(endpoint=endpoint, resume_from=resume_from)
        .execution_options(synchronize_session=False)
    )


def broken_nodes(
    session: Session, job_id: str, attempt: int, *, now: datetime, fresh_s: float, join_s: float
) -> list[str]:
    """Why the attempt's other nodes can no longer finish it, one line per node: its training
    was killed or its worker stopped heartbeating (or never started its part within
    `join_s`). Empty while the group is whole. What node 0 watches while it trains."""
    nodes = [n for n in gang_of(session, job_id, attempt) if n.rank > 0]
    if not nodes:
        return []
    beats = dict(
        session.execute(
            select(Worker.name, Worker.heartbeat_at).where(
                Worker.name.in_([n.worker for n in nodes])
            )
        ).all()
    )
    broken = []
    for node in nodes:
        beat = beats.get(node.worker)
        if node.state in BROKEN_NODE:
            broken.append(f"node {node.rank} ({node.worker}) {node.state}: {node.detail or ''}")
        elif node.state in LIVE_NODE and (
            beat is None or _aware(beat) < now - timedelta(seconds=fresh_s)
        ):
            broken.append(f"node {node.rank} ({node.worker}) stopped heartbeating")
        elif node.state == "reserved" and _aware(node.updated_at) < now - timedelta(seconds=join_s):
            broken.append(f"node {node.rank} ({node.worker}) did not start within {join_s:.0f} s")
    return broken


def unfinished_nodes(session: Session, job_id: str, attempt: int) -> list[JobNode]:
    """The attempt's other nodes still reserved or running."""
    return [n for n in gang_of(session, job_id, attempt) if n.rank > 0 and n.state in LIVE_NODE]


def _aware(t: datetime) -> datetime:
    from datetime import UTC

    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)
