"""Fair share, GPU quotas and GPU-aware admission, on SQLite and PostgreSQL: the order the
queue shows is the order `claim_next` starts jobs in."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from jobs import admin as admin_commands
from jobs.db import session_scope
from jobs.lifecycle import InvalidJob, claim_next, queue_position
from jobs.models import Job, JobEvent
from jobs.progress import heartbeat_worker
from jobs.scheduling import queued_order
from jobs.settings import Settings
from tests.jobs.test_lifecycle import _submit


def _team_of(settings: Settings, job_id: str) -> str:
    with session_scope(settings.database_url) as s:
        return s.get(Job, job_id).team_id


def _start(settings: Settings, n: int, *, gpus: int | None = None) -> list[str]:
    """Claim `n` jobs one after another (none ends), as workers would on n messages."""
    started = []
    for _ in range(n):
        with session_scope(settings.database_url) as s:
            any_queued = s.scalar(select(Job.id).where(Job.state == "queued").limit(1))
            if any_queued is None:
                break
            job = claim_next(s, any_queued, worker="w", lease_seconds=600, worker_gpus=gpus)
            if job is None:
                break
            started.append(job.id)
    return started


def _positions(settings: Settings) -> list[str]:
    with session_scope(settings.database_url) as s:
        order = queued_order(s, ["default"])
        for job_id, position in order.items():
            assert queue_position(s, s.get(Job, job_id)) == position
        return sorted(order, key=order.get)


@pytest.mark.parametrize(("share", "expected"), [(1.0, "ABABABAB"), (3.0, "ABAAABAA")])
def test_teams_start_by_their_use_of_their_share(
    service_settings: Settings,
    admin: tuple[Any, str],
    other_team_user: tuple[Any, str],
    share: float,
    expected: str,
) -> None:
    """Team A (share `share`) floods the queue first; team B (share 1) submits after it.
    Neither a flood nor A's priority 9 puts A's jobs in front of B's fair turns."""
    a, b = admin[0], other_team_user[0]
    with session_scope(service_settings.database_url) as s:
        admin_commands.change_team(s, a.team.name, share=share)
    mine = [_submit(service_settings, a.id, resources={"priority": 9}) for _ in range(8)]
    theirs = [_submit(service_settings, b.id) for _ in range(8)]
    name = {_team_of(service_settings, mine[0]): "A", _team_of(service_settings, theirs[0]): "B"}
    shown = _positions(service_settings)
    started = _start(service_settings, 8)
    assert started == shown[:8]  # the positions shown are the order of starts
    assert "".join(name[_team_of(service_settings, j)] for j in started) == expected
    assert (
        started[0] == mine[0] and [j for j in started if j in mine] == mine[: expected.count("A")]
    )


def test_a_gpu_quota_holds_a_team_and_lets_the_other_through(
    service_settings: Settings, admin: tuple[Any, str], other_team_user: tuple[Any, str]
) -> None:
    a, b = admin[0], other_team_user[0]
    with session_scope(service_settings.database_url) as s:
        info = admin_commands.change_team(s, a.team.name, gpu_quota=3)
        assert (info.gpu_quota, info.share) == (3, 1.0)
    big = [_submit(service_settings, a.id, resources={"gpus": 2}) for _ in range(3)]
    small = _submit(service_settings, b.id, resources={"gpus": 1})
    started = _start(service_settings, 4)
    assert started == [big[0], small]  # A's second 2-GPU job would hold 4 > 3
    with session_scope(service_settings.database_url) as s:
        held = s.scalars(
            select(JobEvent.message).where(JobEvent.job_id == big[1], JobEvent.kind == "held")
        ).all()
        assert held and "quota of 3" in held[0]
        teams = {t.name: t for t in admin_commands.list_teams(s)}
        assert teams[a.team.name].gpus_running == 2 and teams[b.team.name].gpus_running == 1


def test_a_job_waits_for_a_worker_with_enough_gpus(
    service_settings: Settings, admin: tuple[Any, str]
) -> None:
    user = admin[0]
    big = _submit(service_settings, user.id, resources={"gpus": 4})
    small = _submit(service_settings, user.id, resources={"gpus": 1})
    assert _start(service_settings, 1, gpus=2) == [small]  # the 4-GPU job is left in line
    with session_scope(service_settings.database_url) as s:
        assert s.get(Job, big).state == "queued"
        assert claim_next(s, big, worker="w2", lease_seconds=60, worker_gpus=2) is None
        assert s.get(Job, big).dispatched is False  # its turn is published again
    assert _start(service_settings, 1, gpus=8) == [big]


def test_a_job_no_worker_could_hold_is_refused_at_submit(
    service_settings: Settings, admin: tuple[Any, str]
) -> None:
    user = admin[0]
    _submit(service_settings, user.id, resources={"gpus": 16})  # no worker serves it yet: trusted
    with session_scope(service_settings.database_url) as s:
        gpus = [{"index": i, "name": "H200"} for i in range(8)]
        heartbeat_worker(s, name="gpu-node-1", queues=["default"], gpus=gpus, current_job_id=None)
    _submit(service_settings, user.id, resources={"gpus": 8})
    with pytest.raises(InvalidJob, match="largest worker of queue 'default' has 8") as err:
        _submit(service_settings, user.id, resources={"gpus": 9})
    assert err.value.field == "resources.gpus"


def test_a_preempted_job_requeues_without_using_an_attempt(
    service_settings: Settings, admin: tuple[Any, str]
) -> None:
    from jobs.lifecycle import Conflict, release_job, request_preemption

    job_id = _submit(service_settings, admin[0].id)
    with session_scope(service_settings.database_url) as s:
        with pytest.raises(Conflict, match="only a running job"):
            request_preemption(s, s.get(Job, job_id), "test")
        job = claim_next(s, job_id, worker="w#1", lease_seconds=60)
        budget = job.max_attempts
        request_preemption(s, job, "to free a worker")
        assert s.get(Job, job_id).preempt_requested
    with session_scope(service_settings.database_url) as s:
        assert not release_job(s, job_id, worker="w#2", attempt=1, iteration=7)  # not its lease
        assert release_job(s, job_id, worker="w#1", attempt=1, iteration=7)
        job = s.get(Job, job_id)
        assert (job.state, job.attempt, job.max_attempts) == ("queued", 1, budget + 1)
        assert not job.preempt_requested and not job.dispatched
    with session_scope(service_settings.database_url) as s:
        job = claim_next(s, job_id, worker="w#3", lease_seconds=60)
        assert job.attempt == 2 and job.max_attempts - job.attempt == budget - 1
        kinds = s.scalars(select(JobEvent.kind).where(JobEvent.job_id == job_id)).all()
        assert "preempt_requested" in kinds and "preempted" in kinds


def test_a_full_queue_makes_the_team_over_its_share_yield(
    service_settings: Settings, admin: tuple[Any, str], other_team_user: tuple[Any, str]
) -> None:
    from jobs.scheduling import preempt_for_fair_share

    a, b = admin[0], other_team_user[0]
    with session_scope(service_settings.database_url) as s:
        for name in ("n1", "n2"):  # two workers serve the queue: two slots
            heartbeat_worker(s, name=name, queues=["default"], gpus=[], current_job_id=None)
    first, second = (_submit(service_settings, a.id) for _ in range(2))
    for job_id, node in ((first, "n1"), (second, "n2")):  # A holds both slots
        with session_scope(service_settings.database_url) as s:
            assert claim_next(s, job_id, worker=f"{node}#1", lease_seconds=600).id == job_id
    with session_scope(service_settings.database_url) as s:
        assert preempt_for_fair_share(s, ["default"], heartbeat_s=60) == []  # nobody waits
    theirs = _submit(service_settings, b.id)
    with session_scope(service_settings.database_url) as s:
        asked = preempt_for_fair_share(s, ["default"], heartbeat_s=60)
        assert asked == [second]  # A's most recent start yields to B's first job
        assert preempt_for_fair_share(s, ["default"], heartbeat_s=60) == []  # one at a time
    with session_scope(service_settings.database_url) as s:
        from jobs.lifecycle import release_job

        assert release_job(s, second, worker="n2#1", attempt=1, iteration=3)
    assert _start(service_settings, 1) == [theirs]  # the freed slot goes to B, not back to A
    with session_scope(service_settings.database_url) as s:  # 1 job each: no more preemption
        assert preempt_for_fair_share(s, ["default"], heartbeat_s=60) == []


def test_a_cancel_during_the_release_ends_the_job_and_a_job_over_the_quota_is_refused(
    service_settings: Settings, admin: tuple[Any, str]
) -> None:
    from jobs.lifecycle import release_job, request_cancel, request_preemption

    job_id = _submit(service_settings, admin[0].id)
    with session_scope(service_settings.database_url) as s:
        job = claim_next(s, job_id, worker="w#1", lease_seconds=60)
        request_preemption(s, job, "test")
        request_cancel(s, job)  # asked to stop while it checkpoints to yield
    with session_scope(service_settings.database_url) as s:
        assert release_job(s, job_id, worker="w#1", attempt=1, iteration=4)
        assert s.get(Job, job_id).state == "cancelled"  # not requeued, never to run
    with session_scope(service_settings.database_url) as s:
        admin_commands.change_team(s, admin[0].team.name, gpu_quota=2)
    with pytest.raises(InvalidJob, match="GPU quota is 2") as err:
        _submit(service_settings, admin[0].id, resources={"gpus": 4})
    assert err.value.field == "resources.gpus"


def test_the_sweepers_safety_net_settles_a_job_that_missed_its_teachers_end(
    service_settings: Settings, admin: tuple[Any, str]
) -> None:
    from jobs.lifecycle import settle_waiting

    teacher = _submit(service_settings, admin[0].id)
    distill = {"kind": "distill", "distill": {"method": "mimic"}}
    student = _submit(
        service_settings, admin[0].id, teacher={"weights": f"job:{teacher}"}, **distill
    )
    with session_scope(service_settings.database_url) as s:  # the teacher ends behind its back
        s.get(Job, teacher).state = "succeeded"
    with session_scope(service_settings.database_url) as s:
        assert settle_waiting(s) == [student]
        assert s.get(Job, student).state == "queued"
        assert settle_waiting(s) == []
