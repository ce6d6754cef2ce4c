"""Multi-node jobs end to end, on the CPU with gloo: real worker processes as the "machines"
on 127.0.0.1, torchrun on each with a c10d rendezvous, on SQLite + SQLite broker and on
PostgreSQL + Redis."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select

from jobs.broker import dispatch_pending
from jobs.db import session_scope
from jobs.models import Artifact, Job, JobEvent, JobState, MetricPoint, Worker
from jobs.settings import Settings
from tests.worker.conftest import job_row, wait_for

pytestmark = pytest.mark.slow

NO_VAL = {"val": None}


def _ready(settings: Settings, *names: str) -> Callable[[], bool]:
    def check() -> bool:
        with session_scope(settings.database_url) as s:
            return len(s.scalars(select(Worker.name).where(Worker.name.in_(names))).all()) == len(
                names
            )

    return check


def _ended(settings: Settings, job_id: str, timeout: float) -> Job:
    return wait_for(
        lambda: (
            (j := job_row(settings, job_id)).state in ("succeeded", "failed", "cancelled") and j
        ),
        timeout,
        f"job {job_id} to end",
    )


def _student(settings: Settings, job_id: str) -> dict[str, torch.Tensor]:
    path = Path(settings.artifacts_dir or "") / job_id / "run" / "student.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        out: dict[str, torch.Tensor] = {}
        for key, value in obj.items():
            out.update(_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {}


def test_a_two_node_job_trains_what_one_node_of_two_processes_trains(
    service_settings: Settings, submit: Callable[..., str], start_worker: Callable[..., Any]
) -> None:
    """The same spec as 2 nodes x 1 process and as 1 node x 2 processes: identical weights.
    Only node 0's global rank 0 writes: every artifact is in node 0's run folder, the other
    node leaves its log."""
    # one after the other: kombu's SQLite transport races on creating a queue's row
    start_worker("n1")
    wait_for(_ready(service_settings, "n1@test"), 60, "the first worker's heartbeat")
    start_worker("n2")
    wait_for(_ready(service_settings, "n1@test", "n2@test"), 60, "both workers' heartbeats")
    sections: dict[str, Any] = {"schedule": {"iterations": 6}, "checkpoint": {"every": 3}}
    two_nodes = submit("two-nodes", resources={"nodes": 2}, runtime={"nproc": 1}, **sections)
    dispatch_pending(service_settings)
    job = _ended(service_settings, two_nodes, 240)
    assert job.state == JobState.succeeded, job.error
    one_node = submit("one-node", runtime={"nproc": 2}, **sections)
    dispatch_pending(service_settings)
    assert _ended(service_settings, one_node, 240).state == JobState.succeeded
    a = _tensors(_student(service_settings, two_nodes))
    b = _tensors(_student(service_settings, one_node))
    assert a.keys() == b.keys() and a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    with session_scope(service_settings.database_url) as s:
        names = set(s.scalars(select(Artifact.name).where(Artifact.job_id == two_nodes)))
        events = [e.kind for e in s.scalars(select(JobEvent).where(JobEvent.job_id == two_nodes))]
    assert {"run/student.pt", "run/eval.json", "logs.txt", "node-1.log"} <= names
    assert "gang" in events
    logs = (Path(service_settings.artifacts_dir or "") / two_nodes / "logs.txt").read_text()
    assert "node 0 of 2, rendezvous 127.0.0.1:" in logs


def test_killing_a_node_restarts_the_group_from_its_checkpoint(
    service_settings: Settings, submit: Callable[..., str], start_worker: Callable[..., Any]
) -> None:
    """kill -9 of the second node's worker (its torchrun and ranks with it) mid-run: node 0
    sees the node gone, stops, and the job goes back to the queue on an attempt; the next gang
    (with a fresh worker) resumes from the last checkpoint and finishes."""
    every = 4
    first = start_worker("n1")
    wait_for(_ready(service_settings, "n1@test"), 60, "the first worker's heartbeat")
    second = start_worker("n2")
    wait_for(_ready(service_settings, "n1@test", "n2@test"), 60, "both workers' heartbeats")
    job_id = submit(
        "kill-a-node",
        resources={"nodes": 2},
        schedule={"iterations": 16},
        checkpoint={"every": every},
        runtime={"nproc": 1, "log_every": 1},
    )
    dispatch_pending(service_settings)
    wait_for(lambda: job_row(service_settings, job_id).state == "running", 60, "the claim")
    leader = job_row(service_settings, job_id).lease_owner or ""
    node1 = second if leader.startswith("n1@") else first
    ckpt = f"run/checkpoints/attempt-1/ckpt_{every:08d}.pt"
    wait_for(lambda: ckpt in _names(service_settings, job_id), 180, "the first checkpoint")
    wait_for(lambda: job_row(service_settings, job_id).iteration >= every + 2, 60, "progress")
    node1.kill(signal.SIGKILL)
    start_worker("n3")
    job = _ended(service_settings, job_id, 300)
    assert job.state == JobState.succeeded, job.error
    assert job.attempt == 2 and job.iteration == 16
    with session_scope(service_settings.database_url) as s:
        events = [
            (e.kind, e.message)
            for e in s.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            )
        ]
        second_from = s.scalar(
            select(MetricPoint.iteration)
            .where(MetricPoint.job_id == job_id, MetricPoint.attempt == 2)
            .order_by(MetricPoint.iteration)
            .limit(1)
        )
    lost = [m for k, m in events if k == "node_lost"]
    assert lost and "node 1" in lost[0], events
    assert [k for k, _ in events].count("gang") == 2
    logs = (Path(service_settings.artifacts_dir or "") / job_id / "logs.txt").read_text()
    assert "resuming from run/checkpoints/attempt-1/ckpt_" in logs
    assert second_from is not None and second_from > every  # resumed, not started over


def _names(settings: Settings, job_id: str) -> set[str]:
    with session_scope(settings.database_url) as s:
        return set(s.scalars(select(Artifact.name).where(Artifact.job_id == job_id)))
