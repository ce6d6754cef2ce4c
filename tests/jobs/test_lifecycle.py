"""The state machine and lease protocol on a real database (SQLite, and PostgreSQL in CI)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from jobs.db import session_scope
from jobs.lifecycle import (
    Conflict,
    InvalidJob,
    NotFound,
    claim_job,
    finish_job,
    mark_dispatched,
    pending_dispatch,
    queue_position,
    renew_lease,
    request_cancel,
    requeue_expired,
    retry_job,
    settle_dependents,
    submit_job,
    visible_job,
)
from jobs.models import Job, JobEvent, JobState, User, utcnow
from jobs.schemas import JobSpec
from jobs.settings import Settings
from tests.conftest import png_bytes

# Enough images for a batch of 2 on every process of the largest job submitted here (8 GPUs
# on each of 3 nodes): submit refuses a job whose processes would not fill one batch.
IMAGES = 48


def _spec(root: Path, **extra: object) -> JobSpec:
    (root / "d" / "img").mkdir(parents=True, exist_ok=True)
    png = png_bytes(8, 8)
    for i in range(IMAGES):
        (root / "d" / "img" / f"{i}.png").write_bytes(png)
    images = [
        {"id": i + 1, "file_name": f"{i}.png", "width": 8, "height": 8} for i in range(IMAGES)
    ]
    boxes = [
        {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [1, 1, 4, 4]}
        for i in range(IMAGES)
    ]
    coco = {"images": images, "annotations": boxes, "categories": [{"id": 1, "name": "c"}]}
    (root / "d" / "a.json").write_text(json.dumps(coco))
    data = {"train": {"images": str(root / "d" / "img"), "annotations": str(root / "d" / "a.json")}}
    return JobSpec.model_validate({"name": "j", "data": data, "student": {}, **extra})


def _submit(settings: Settings, user_id: int, **extra: object) -> str:
    with session_scope(settings.database_url) as s:
        user = s.get(User, user_id)
        job, created = submit_job(
            s, user=user, spec=_spec(settings.dataset_roots[0], **extra), settings=settings
        )
        assert created
        return job.id


def test_claim_is_exclusive_and_counts_attempts(service_settings: Settings, admin: tuple) -> None:
    url = service_settings.database_url
    job_id = _submit(service_settings, admin[0].id)
    with session_scope(url) as s:
        assert [j.id for j in pending_dispatch(s)] == [job_id]
        mark_dispatched(s, job_id)
        assert pending_dispatch(s) == []
    with session_scope(url) as s:
        job = claim_job(s, job_id, worker="w1", lease_seconds=30)
        assert job is not None and job.attempt == 1 and job.state == JobState.running
    with session_scope(url) as s:  # the same message delivered again: ignored
        assert claim_job(s, job_id, worker="w2", lease_seconds=30) is None
        assert renew_lease(s, job_id, worker="w1", attempt=1, lease_seconds=30)
        assert not renew_lease(s, job_id, worker="w2", attempt=1, lease_seconds=30)
        assert not finish_job(s, job_id, worker="w2", attempt=1, state=JobState.succeeded)
        assert finish_job(s, job_id, worker="w1", attempt=1, state=JobState.succeeded)
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.succeeded and job.attempt == 1
        kinds = [e.kind for e in s.query(JobEvent).filter_by(job_id=job_id).order_by(JobEvent.id)]
        assert kinds == ["submitted", "dispatched", "claimed", "succeeded"]


def test_expired_lease_is_requeued_then_exhausted(service_settings: Settings, admin: tuple) -> None:
    url = service_settings.database_url
    job_id = _submit(service_settings, admin[0].id)
    later = utcnow() + timedelta(seconds=120)
    for attempt in (1, 2, 3):
        with session_scope(url) as s:
            now = utcnow() + timedelta(seconds=120 * (attempt - 1))
            assert claim_job(s, job_id, worker=f"w{attempt}", lease_seconds=60, now=now)
        with session_scope(url) as s:  # the worker died: its lease runs out
            later = utcnow() + timedelta(seconds=120 * attempt)
            ids = requeue_expired(s, now=later)
            if attempt < 3:
                assert ids == [job_id]
                assert s.get(Job, job_id).state == JobState.queued
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.failed
        assert "after 3 attempts" in job.error
        assert claim_job(s, job_id, worker="w4", lease_seconds=60, now=later) is None


def test_a_dead_workers_job_can_be_claimed_after_expiry(
    service_settings: Settings, admin: tuple
) -> None:
    url = service_settings.database_url
    job_id = _submit(service_settings, admin[0].id)
    with session_scope(url) as s:
        claim_job(s, job_id, worker="w1", lease_seconds=10)
    with session_scope(url) as s:
        assert claim_job(s, job_id, worker="w2", lease_seconds=10) is None
        job = claim_job(
            s, job_id, worker="w2", lease_seconds=10, now=utcnow() + timedelta(seconds=11)
        )
        assert job is not None and job.attempt == 2 and job.lease_owner == "w2"
    with session_scope(url) as s:  # the old owner finds out at its next renewal
        assert not renew_lease(s, job_id, worker="w1", attempt=1, lease_seconds=10)
        # and a stale process under the new owner's name, still on attempt 1, is fenced too
        assert not renew_lease(s, job_id, worker="w2", attempt=1, lease_seconds=10)
        assert not finish_job(s, job_id, worker="w2", attempt=1, state=JobState.failed)
        assert renew_lease(s, job_id, worker="w2", attempt=2, lease_seconds=10)


def test_cancel_and_retry(service_settings: Settings, admin: tuple) -> None:
    url = service_settings.database_url
    queued, running = _submit(service_settings, admin[0].id), _submit(service_settings, admin[0].id)
    with session_scope(url) as s:
        claim_job(s, running, worker="w", lease_seconds=30)
    with session_scope(url) as s:
        assert request_cancel(s, s.get(Job, queued)).state == JobState.cancelled
        job = request_cancel(s, s.get(Job, running))
        assert job.state == JobState.running and job.cancel_requested
        with pytest.raises(Conflict):
            request_cancel(s, s.get(Job, queued))
        with pytest.raises(Conflict):
            retry_job(s, s.get(Job, running))
        assert finish_job(s, running, worker="w", attempt=1, state=JobState.cancelled)
    with session_scope(url) as s:
        job = retry_job(s, s.get(Job, running))
        assert job.state == JobState.queued and not job.dispatched and not job.cancel_requested
        assert job.max_attempts == job.attempt + 3


def test_queue_positions_follow_priority_then_age(service_settings: Settings, admin: tuple) -> None:
    a = _submit(service_settings, admin[0].id)
    b = _submit(service_settings, admin[0].id)
    c = _submit(service_settings, admin[0].id, resources={"priority": 5})
    with session_scope(service_settings.database_url) as s:
        assert [queue_position(s, s.get(Job, i)) for i in (c, a, b)] == [1, 2, 3]


def test_paths_teams_and_teacher_refs(
    service_settings: Settings, admin: tuple, other_team_user: tuple, tmp_path: Path
) -> None:
    url = service_settings.database_url
    job_id = _submit(service_settings, admin[0].id)
    with session_scope(url) as s:
        other = s.get(User, other_team_user[0].id)
        with pytest.raises(NotFound):
            visible_job(s, other, job_id)
        outside = tmp_path / "elsewhere"
        with pytest.raises(InvalidJob) as err:
            submit_job(s, user=other, spec=_spec(outside), settings=service_settings)
        assert err.value.field == "data.train.images"
        ref = {
            "teacher": {"weights": f"job:{job_id}"},
            "distill": {"method": "mimic"},
            "kind": "distill",
        }
        spec = _spec(service_settings.dataset_roots[0], **ref)
        with pytest.raises(InvalidJob, match="visible"):
            submit_job(s, user=other, spec=spec, settings=service_settings)
        mine = s.get(User, admin[0].id)
        waiting, _ = submit_job(s, user=mine, spec=spec, settings=service_settings)
        assert waiting.state == JobState.waiting and waiting.teacher_job_id == job_id
        evaluation = {"kind": "evaluate", "student": {"weights": f"job:{waiting.id}"}}
        split = {"images": str(service_settings.dataset_roots[0] / "d" / "img")}
        split["annotations"] = str(service_settings.dataset_roots[0] / "d" / "a.json")
        evaluation["data"] = {"train": split, "val": split}
        with pytest.raises(InvalidJob, match="waiting, not succeeded"):
            spec = _spec(service_settings.dataset_roots[0], **evaluation)
            submit_job(s, user=mine, spec=spec, settings=service_settings)


def test_idempotency_key_returns_the_first_job(service_settings: Settings, admin: tuple) -> None:
    with session_scope(service_settings.database_url) as s:
        user = s.get(User, admin[0].id)
        spec = _spec(service_settings.dataset_roots[0])
        first, c1 = submit_job(
            s, user=user, spec=spec, settings=service_settings, idempotency_key="k"
        )
        again, c2 = submit_job(
            s, user=user, spec=spec, settings=service_settings, idempotency_key="k"
        )
        assert (c1, c2) == (True, False) and first.id == again.id


def test_a_lost_message_is_published_again(service_settings: Settings, admin: tuple) -> None:
    job_id = _submit(service_settings, admin[0].id)
    with session_scope(service_settings.database_url) as s:
        mark_dispatched(s, job_id)
    with session_scope(service_settings.database_url) as s:
        assert pending_dispatch(s, redispatch_seconds=600) == []
        s.get(Job, job_id).updated_at = utcnow() - timedelta(seconds=601)
    with session_scope(service_settings.database_url) as s:
        assert [j.id for j in pending_dispatch(s, redispatch_seconds=600)] == [job_id]
        assert pending_dispatch(s) == []  # without the option only undispatched jobs


def test_cancelling_a_job_whose_worker_is_gone_ends_it_at_once(
    service_settings: Settings, admin: tuple
) -> None:
    job_id = _submit(service_settings, admin[0].id)
    with session_scope(service_settings.database_url) as s:
        claim_job(s, job_id, worker="w", lease_seconds=30, now=utcnow() - timedelta(seconds=60))
    with session_scope(service_settings.database_url) as s:
        job = request_cancel(s, s.get(Job, job_id))
        assert job.state == JobState.cancelled and job.lease_owner is None
    with session_scope(service_settings.database_url) as s:  # the sweeper finds nothing to do
        assert requeue_expired(s) == []
        assert not finish_job(s, job_id, worker="w", attempt=1, state=JobState.failed)


def test_leases_run_on_the_database_clock_not_the_hosts(
    service_settings: Settings, admin: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose clock runs an hour ahead neither grants itself a longer lease nor sees
    other workers' leases as expired: lease times come from the database server."""
    import datetime as dt

    from jobs import db

    url = service_settings.database_url
    job_id = _submit(service_settings, admin[0].id)
    with session_scope(url) as s:
        truth = db.db_clock(s)
        if s.get_bind().dialect.name == "sqlite":
            pytest.skip("SQLite runs in this process: its clock is the host's")

    class Ahead(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:  # type: ignore[override]
            return dt.datetime.now(tz) + timedelta(hours=1)

    monkeypatch.setattr("jobs.models.datetime", Ahead)  # utcnow(): the host's clock
    with session_scope(url) as s:
        job = claim_job(s, job_id, worker="w1", lease_seconds=60)
        assert job is not None
        expires = job.lease_expires_at
        assert abs((expires - truth).total_seconds() - 60) < 30
        assert requeue_expired(s) == []  # an hour ahead would call it expired
        assert renew_lease(s, job_id, worker="w1", attempt=1, lease_seconds=60)


def test_a_team_at_its_cap_waits_and_runs_when_a_job_ends(
    service_settings: Settings, admin: tuple
) -> None:
    from jobs.models import Team

    url = service_settings.database_url
    first, second = (_submit(service_settings, admin[0].id) for _ in range(2))
    with session_scope(url) as s:
        assert claim_job(s, first, worker="w1", lease_seconds=60, team_cap=1) is not None
    with session_scope(url) as s:
        assert claim_job(s, second, worker="w2", lease_seconds=60, team_cap=1) is None
        job = s.get(Job, second)
        assert job.state == JobState.queued and job.attempt == 0
        assert not job.dispatched  # the sweeper publishes it again
        held = s.scalars(select(JobEvent.message).where(JobEvent.job_id == second)).all()
        assert "team runs 1 job(s), its cap is 1" in held
    with session_scope(url) as s:  # the team's own cap overrides the deployment's default
        s.get(Team, admin[0].team_id).max_running = 2
    with session_scope(url) as s:
        assert claim_job(s, second, worker="w2", lease_seconds=60, team_cap=1) is not None
    third = _submit(service_settings, admin[0].id)
    with session_scope(url) as s:
        assert claim_job(s, third, worker="w3", lease_seconds=60, team_cap=1) is None
        assert finish_job(s, first, worker="w1", attempt=1, state=JobState.succeeded)
    with session_scope(url) as s:
        assert claim_job(s, third, worker="w3", lease_seconds=60, team_cap=1) is not None


def test_jobs_start_in_the_order_their_positions_show_whatever_message_arrives(
    service_settings: Settings, admin: tuple
) -> None:
    """On every broker: a delivered message starts the queue's first job, so a FIFO broker
    (or a re-published message at the back of Redis' list) cannot reorder the queue."""
    from jobs.lifecycle import claim_next

    url = service_settings.database_url
    low_old = _submit(service_settings, admin[0].id)
    high_old = _submit(service_settings, admin[0].id, resources={"priority": 5})
    low_new = _submit(service_settings, admin[0].id)
    high_new = _submit(service_settings, admin[0].id, resources={"priority": 5})
    with session_scope(url) as s:
        shown = sorted(
            (queue_position(s, s.get(Job, j)), j) for j in (low_old, high_old, low_new, high_new)
        )
    expected = [high_old, high_new, low_old, low_new]
    assert [j for _, j in shown] == expected
    started = []
    for message in (low_new, low_old, low_new, high_new):  # messages in any order
        with session_scope(url) as s:
            job = claim_next(s, message, worker="w", lease_seconds=60)
            assert job is not None
            started.append(job.id)
    assert started == expected
    with session_scope(url) as s:  # a turn left over finds nothing, and runs nothing twice
        assert claim_next(s, low_old, worker="w", lease_seconds=60) is None


def test_a_job_id_prefix_must_name_one_job_of_the_team(
    service_settings: Settings, admin: tuple
) -> None:
    url = service_settings.database_url
    first = _submit(service_settings, admin[0].id)
    twin = first[:6] + ("0" if first[6] != "0" else "1") + first[7:]
    with session_scope(url) as s:  # another job whose id shares the first six characters
        original = s.get(Job, first)
        columns = {c.key: getattr(original, c.key) for c in Job.__table__.columns}
        s.add(Job(**{**columns, "id": twin, "idempotency_key": None}))
    teacher = {"backbone": "resnet34", "weights": f"job:{first[:6]}"}
    distill = {"kind": "distill", "teacher": teacher, "distill": {"method": "hmkd"}}
    with pytest.raises(InvalidJob, match="names more than one job") as err:
        _submit(service_settings, admin[0].id, **distill)
    assert err.value.field == "teacher.weights"
    teacher["weights"] = f"job:{first[:7]}"  # one more character: the first job alone
    waiting = _submit(service_settings, admin[0].id, **distill)
    with session_scope(url) as s:
        assert s.get(Job, waiting).teacher_job_id == first


def test_a_capped_teams_backlog_does_not_hide_another_teams_job(
    service_settings: Settings, admin: tuple, other_team_user: tuple
) -> None:
    from jobs.lifecycle import claim_next

    url = service_settings.database_url
    running = _submit(service_settings, admin[0].id)
    with session_scope(url) as s:
        assert claim_job(s, running, worker="w0", lease_seconds=60, team_cap=1) is not None
    backlog = [_submit(service_settings, admin[0].id) for _ in range(5)]
    theirs = _submit(service_settings, other_team_user[0].id)
    with session_scope(url) as s:  # a line shorter than the capped team's backlog
        job = claim_next(s, backlog[0], worker="w1", lease_seconds=60, team_cap=1, look_ahead=3)
        assert job is not None and job.id == theirs


def _finish(settings: Settings, job_id: str, state: JobState) -> None:
    with session_scope(settings.database_url) as s:
        assert claim_job(s, job_id, worker="w", lease_seconds=60) is not None
    with session_scope(settings.database_url) as s:
        error = None if state == JobState.succeeded else "it broke"
        assert finish_job(s, job_id, worker="w", attempt=1, state=state, error=error)


def _states(settings: Settings, *job_ids: str) -> list[str]:
    with session_scope(settings.database_url) as s:
        return [s.get(Job, j).state for j in job_ids]


def _distill(teacher_id: str) -> dict[str, object]:
    return {
        "kind": "distill",
        "distill": {"method": "mimic"},
        "teacher": {"weights": f"job:{teacher_id}"},
    }


def test_a_waiting_student_is_queued_when_its_teacher_succeeds(
    service_settings: Settings, admin: tuple
) -> None:
    url = service_settings.database_url
    teacher = _submit(service_settings, admin[0].id)
    student = _submit(service_settings, admin[0].id, **_distill(teacher[:8]))
    with session_scope(url) as s:
        job = s.get(Job, student)
        assert job.state == JobState.waiting and queue_position(s, job) is None
        assert [j.id for j in pending_dispatch(s)] == [teacher]  # nothing to publish for it
        assert claim_job(s, student, worker="w", lease_seconds=60) is None  # not claimable
        where = job.resolved_spec["teacher"]["weights"]
        assert where.endswith(f"{teacher}/run/student.pt")  # where the teacher will write it
    _finish(service_settings, teacher, JobState.succeeded)
    with session_scope(url) as s:
        assert s.get(Job, student).state == JobState.queued
        assert [j.id for j in pending_dispatch(s)] == [student]
        kinds = [e.kind for e in s.query(JobEvent).filter_by(job_id=student).order_by(JobEvent.id)]
        assert kinds == ["submitted", "waiting", "queued"]
        settle_dependents(s, teacher)  # settling twice changes nothing
        assert s.get(Job, student).state == JobState.queued


@pytest.mark.parametrize("ending", [JobState.failed, JobState.cancelled])
def test_a_teacher_that_does_not_succeed_fails_its_chain_of_students(
    service_settings: Settings, admin: tuple, ending: JobState
) -> None:
    url = service_settings.database_url
    teacher = _submit(service_settings, admin[0].id)
    student = _submit(service_settings, admin[0].id, **_distill(teacher))
    grandchild = _submit(service_settings, admin[0].id, **_distill(student))
    assert _states(service_settings, student, grandchild) == ["waiting", "waiting"]
    if ending == JobState.cancelled:
        with session_scope(url) as s:
            request_cancel(s, s.get(Job, teacher))
    else:
        _finish(service_settings, teacher, ending)
    assert _states(service_settings, teacher, student, grandchild) == [ending, "failed", "failed"]
    with session_scope(url) as s:
        assert s.get(Job, student).error.startswith(f"teacher job {teacher} {ending.value}")
        assert f"teacher job {student} failed" in s.get(Job, grandchild).error
        with pytest.raises(Conflict, match="retry the teacher first"):
            retry_job(s, s.get(Job, student))
        retry_job(s, s.get(Job, teacher))
        retry_job(s, s.get(Job, student))  # its teacher may succeed again: it waits for it
        assert s.get(Job, student).state == JobState.waiting
    with session_scope(url) as s:  # a waiting job can be cancelled; so its students fail
        request_cancel(s, s.get(Job, student))
        assert s.get(Job, student).state == JobState.cancelled


def test_a_failed_job_cannot_be_a_teacher(service_settings: Settings, admin: tuple) -> None:
    teacher = _submit(service_settings, admin[0].id)
    _finish(service_settings, teacher, JobState.failed)
    with pytest.raises(InvalidJob, match="is failed: retry it"):
        _submit(service_settings, admin[0].id, **_distill(teacher))
