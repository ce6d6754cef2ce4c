"""Gang admission of multi-node jobs, on SQLite and PostgreSQL: all nodes or none, a reserved
worker takes nothing else, two gangs never split the workers between them, and a lost node
sends the whole group back to the queue on an attempt."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from jobs.db import session_scope
from jobs.gang import broken_nodes, gang_of, mark_node, reserved_for
from jobs.lifecycle import InvalidJob, claim_next, restart_group
from jobs.models import Job, JobNode, JobState, Worker, utcnow
from jobs.progress import heartbeat_worker
from jobs.settings import Settings
from tests.jobs.test_lifecycle import _submit

H200 = {"name": "H200"}


def _workers(settings: Settings, *names: str, gpus: int = 0, queue: str = "default") -> None:
    with session_scope(settings.database_url) as s:
        for name in names:
            heartbeat_worker(
                s,
                name=name,
                queues=[queue],
                gpus=[{"index": i, **H200} for i in range(gpus)],
                current_job_id=None,
            )


def _claim(settings: Settings, job_id: str, worker: str) -> Job | None:
    with session_scope(settings.database_url) as s:
        job = claim_next(s, job_id, worker=f"{worker}#1", lease_seconds=600, worker_fresh_s=60)
        return None if job is None else s.get(Job, job.id)


def _gang(settings: Settings, job_id: str) -> list[tuple[int, str, str]]:
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        return [(n.rank, n.worker, n.state) for n in gang_of(s, job_id, job.attempt)]


def test_a_two_node_job_reserves_its_second_worker_in_the_same_claim(
    service_settings: Settings, admin: tuple[Any, str]
) -> None:
    _workers(service_settings, "a", "b", gpus=2)
    job_id = _submit(service_settings, admin[0].id, resources={"gpus": 2, "nodes": 2})
    job = _claim(service_settings, job_id, "a")
    assert job is not None and job.id == job_id and job.nodes == 2
    assert _gang(service_settings, job_id) == [(0, "a", "running"), (1, "b", "reserved")]
    with session_scope(service_settings.database_url) as s:
        assert reserved_for(s, "b") == job_id and reserved_for(s, "a") is None


def test_without_enough_free_workers_nothing_is_held_and_a_smaller_job_goes_first(
    service_settings: Settings, admin: tuple[Any, str]
) -> None:
    user = admin[0].id
    _workers(service_settings, "a", "b", "c")
    busy = _submit(service_settings, user)
    assert _claim(service_settings, busy, "c").id == busy  # c is taken: two workers are free
    big = _submit(service_settings, user, resources={"nodes": 3})
    small = _submit(service_settings, user)
    job = _claim(service_settings, big, "a")
    assert job is not None and job.id == small  # backfill: the gang cannot form now
    with session_scope(service_settings.database_url) as s:
        big_row = s.get(Job, big)
        assert big_row.state == JobState.queued and big_row.attempt == 0
        assert not big_row.dispatched  # its turn is published again by the sweep
        assert s.scalars(select(JobNode)).all() == []


def test_a_reserved_worker_takes_no_other_job(
    service_settings: Settings, admin: tuple[Any, str]
) -> None:
    user = admin[0].id
    _workers(service_settings, "a", "b")
    gang = _submit(service_settings, user, resources={"nodes": 2})
    assert _claim(service_settings, gang, "a").id == gang
    other = _submit(service_settings, user)
    assert _claim(service_settings, other, "b") is None  # b's next task is its node of `gang`
    with session_scope(service_settings.database_url) as s:
        assert s.get(Job, other).state == JobState.queued
    _workers(service_settings, "c")
    assert _claim(service_settings, other, "c").id == other


def test_two_gangs_never_split_the_workers_between_them(
    service_settings: Settings, admin: tuple[Any, str]
) -> None:
    """Three workers, two 2-node jobs: one gang gets two workers, the other waits whole; it
    starts when the first ends, and never on a worker still busy."""
    user = admin[0].id
    _workers(service_settings, "a", "b", "c")
    first = _submit(service_settings, user, resources={"nodes": 2})
    second = _submit(service_settings, user, resources={"nodes": 2})
    assert _claim(service_settings, first, "a").id == first
    assert _claim(service_settings, second, "c") is None  # a and b are taken: c alone is no gang
    assert _gang(service_settings, first) == [(0, "a", "running"), (1, "b", "reserved")]
    with session_scope(service_settings.database_url) as s:
        assert s.get(Job, second).state == JobState.queued
        s.execute(update(Job).where(Job.id == first).values(state="succeeded"))
    assert _claim(service_settings, second, "c").id == second
    assert [w for _, w, _ in _gang(service_settings, second)] == ["c", "a"]


@pytest.mark.parametrize("why", ["stale", "draining", "small", "other queue"])
def test_peers_must_be_alive_serving_the_queue_and_big_enough(
    service_settings: Settings, admin: tuple[Any, str], why: str
) -> None:
    job_id = _submit(service_settings, admin[0].id, resources={"gpus": 2, "nodes": 2})
    _workers(service_settings, "a", gpus=2)
    if why == "other queue":
        _workers(service_settings, "b", gpus=2, queue="gpu-big")
    else:
        _workers(service_settings, "b", gpus=1 if why == "small" else 2)
    with session_scope(service_settings.database_url) as s:
        b = update(Worker).where(Worker.name == "b")
        if why == "stale":
            s.execute(b.values(heartbeat_at=utcnow() - timedelta(hours=1)))
        if why == "draining":
            s.execute(b.values(draining=True))
    assert _claim(service_settings, job_id, "a") is None
    _workers(service_settings, "c", gpus=2)
    assert _claim(service_settings, job_id, "a").id == job_id
    assert [w for _, w, _ in _gang(service_settings, job_id)] == ["a", "c"]


def test_a_job_needing_more_nodes_than_the_queue_has_is_refused_at_submit(
    service_settings: Settings, admin: tuple[Any, str]
) -> None:
    user = admin[0].id
    _submit(service_settings, user, resources={"nodes": 4})  # no worker known yet: trusted
    _workers(service_settings, "a", "b", gpus=8)
    _workers(service_settings, "c", gpus=4)
    _submit(service_settings, user, resources={"gpus": 4, "nodes": 3})
    with pytest.raises(
        InvalidJob, match="3 nodes with 8 GPU\\(s\\) each, but queue 'default' has 2"
    ) as err:
        _submit(service_settings, user, resources={"gpus": 8, "nodes": 3})
    assert err.value.field == "resources.nodes"


def test_a_gangs_gpus_count_on_every_node_against_the_quota(
    service_settings: Settings, admin: tuple[Any, str]
) -> None:
    from jobs import admin as admin_commands

    with session_scope(service_settings.database_url) as s:
        admin_commands.change_team(s, admin[0].team.name, gpu_quota=8)
    _submit(service_settings, admin[0].id, resources={"gpus": 4, "nodes": 2})
    with pytest.raises(InvalidJob, match="12 GPUs \\(3 node\\(s\\) of 4\\)"):
        _submit(service_settings, admin[0].id, resources={"gpus": 4, "nodes": 3})


def test_a_lost_node_restarts_the_group_on_an_attempt_until_none_is_left(
    service_settings: Settings, admin: tuple[Any, str]
) -> None:
    _workers(service_settings, "a", "b", "c")
    job_id = _submit(service_settings, admin[0].id, resources={"nodes": 2})
    for attempt in (1, 2, 3):
        job = _claim(service_settings, job_id, "a")
        assert job is not None and job.attempt == attempt
        with session_scope(service_settings.database_url) as s:
            assert not restart_group(s, job_id, worker="x#1", attempt=attempt, reason="r")
            state = restart_group(
                s, job_id, worker="a#1", attempt=attempt, reason="node 1 (b) stopped heartbeating"
            )
        assert state == (JobState.queued if attempt < 3 else JobState.failed)
    with session_scope(service_settings.database_url) as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.failed and "a node was lost" in job.error
        assert reserved_for(s, "b") is None  # an ended job reserves nobody


def test_broken_nodes_names_the_lost_the_killed_and_the_late(
    service_settings: Settings, admin: tuple[Any, str]
) -> None:
    _workers(service_settings, "a", "b", "c", "d")
    job_id = _submit(service_settings, admin[0].id, resources={"nodes": 4})
    assert _claim(service_settings, job_id, "a") is not None
    url = service_settings.database_url

    def broken(join_s: float = 600) -> list[str]:
        with session_scope(url) as s:
            return broken_nodes(s, job_id, 1, now=utcnow(), fresh_s=60, join_s=join_s)

    assert broken() == []
    with session_scope(url) as s:
        assert mark_node(s, job_id, 1, 1, "running", only_from=("reserved",))
        assert not mark_node(s, job_id, 1, 1, "running", only_from=("reserved",))
        mark_node(s, job_id, 1, 2, "killed", "torchrun killed by signal 9")
        s.execute(
            update(Worker)
            .where(Worker.name == "b")
            .values(heartbeat_at=utcnow() - timedelta(minutes=5))
        )
    found = broken()
    assert len(found) == 2
    assert "node 1 (b) stopped heartbeating" in found[0]
    assert "node 2 (c) killed: torchrun killed by signal 9" in found[1]
    assert any("node 3 (d) did not start within 0 s" in line for line in broken(join_s=0))


def test_sigterm_on_any_node_of_a_gang_checkpoints_and_requeues_the_whole_job(
    service_settings: Settings, admin: tuple[Any, str]
) -> None:
    """A deploy stopping the second node's worker asks the job (whose lease node 0 holds) to
    checkpoint and come back to the queue, as it would for the lease holder."""
    from worker.celery_app import release_jobs_of

    _workers(service_settings, "a", "b")
    job_id = _submit(service_settings, admin[0].id, resources={"nodes": 2})
    assert _claim(service_settings, job_id, "a") is not None
    assert release_jobs_of(service_settings, "b") == [job_id]
    with session_scope(service_settings.database_url) as s:
        job = s.get(Job, job_id)
        assert job.preempt_requested and job.state == JobState.running
        assert s.get(Worker, "b").draining


def test_a_node_lost_while_its_gang_was_asked_to_yield_costs_no_attempt(
    service_settings: Settings, admin: tuple[Any, str]
) -> None:
    """A reserved worker stopped by a deploy before its part started: the group cannot
    checkpoint, but the job was asked to give its workers back, so its attempt is refunded."""
    from worker.celery_app import release_jobs_of

    _workers(service_settings, "a", "b")
    job_id = _submit(service_settings, admin[0].id, resources={"nodes": 2})
    assert _claim(service_settings, job_id, "a") is not None
    release_jobs_of(service_settings, "b")
    with session_scope(service_settings.database_url) as s:
        before = s.get(Job, job_id).max_attempts
        assert restart_group(s, job_id, worker="a#1", attempt=1, reason="node 1 (b) gone")
    with session_scope(service_settings.database_url) as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.queued and job.max_attempts == before + 1
        assert not job.preempt_requested
