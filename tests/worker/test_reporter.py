"""DbReporter on a real database: throttled progress, artifacts, and the stop signal."""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from hmkd_core.engine import Progress
from jobs.db import session_scope
from jobs.lifecycle import claim_job, request_cancel, requeue_expired
from jobs.models import Artifact, Job, MetricPoint, utcnow
from jobs.settings import Settings
from worker.reporter import DbReporter

WORKER = "w1@test#1"


def _claimed(settings: Settings, submit: Callable[..., str]) -> str:
    job_id = submit()
    with session_scope(settings.database_url) as session:
        assert claim_job(session, job_id, worker=WORKER, lease_seconds=60) is not None
    return job_id


def _reporter(settings: Settings, job_id: str, **kw: float) -> DbReporter:
    return DbReporter(
        database_url=settings.database_url,
        job_id=job_id,
        worker=WORKER,
        attempt=1,
        job_dir=Path(settings.artifacts_dir) / job_id,
        **kw,
    )


def _progress(i: int, total: int = 10) -> Progress:
    return Progress(i, total, 4.0, 1.0, 0.01, {"loss_rpn": 0.5, "loss_cls": math.nan})


def test_progress_is_throttled_but_the_last_iteration_always_written(
    service_settings: Settings, submit: Callable[..., str]
) -> None:
    job_id = _claimed(service_settings, submit)
    reporter = _reporter(service_settings, job_id, throttle_seconds=3600)
    for i in range(1, 11):
        reporter.on_progress(_progress(i))
    with session_scope(service_settings.database_url) as session:
        points = session.scalars(select(MetricPoint.iteration).where(MetricPoint.job_id == job_id))
        assert sorted(points) == [1, 10]
        job = session.get(Job, job_id)
        assert job.iteration == 10 and job.losses == {"loss_rpn": 0.5, "loss_cls": None}


def test_pickles_without_a_connection_and_stops_on_cancel(
    service_settings: Settings, submit: Callable[..., str]
) -> None:
    job_id = _claimed(service_settings, submit)
    reporter = _reporter(service_settings, job_id, check_seconds=0, supervisor_pid=os.getpid())
    assert not reporter.should_stop()
    clone = pickle.loads(pickle.dumps(reporter))  # what a spawned rank receives
    with session_scope(service_settings.database_url) as session:
        request_cancel(session, session.get(Job, job_id))
    assert clone.should_stop() and clone.stop_reason == "cancel requested"


def test_stops_when_the_lease_is_lost(
    service_settings: Settings, submit: Callable[..., str]
) -> None:
    job_id = _claimed(service_settings, submit)
    reporter = _reporter(service_settings, job_id, check_seconds=0)
    with session_scope(service_settings.database_url) as session:  # presumed dead: re-queued
        session.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)
    with session_scope(service_settings.database_url) as session:
        assert requeue_expired(session) == [job_id]
    assert reporter.should_stop() and "lease lost" in (reporter.stop_reason or "")


def test_artifacts_are_registered_relative_to_the_job_folder(
    service_settings: Settings, submit: Callable[..., str]
) -> None:
    job_id = _claimed(service_settings, submit)
    ckpts = Path(service_settings.artifacts_dir) / job_id / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    reporter = _reporter(service_settings, job_id)
    for it in (5, 10):
        (ckpts / f"ckpt_{it:08d}.pt").write_bytes(b"x" * it)
        reporter.on_artifact("checkpoint", ckpts / f"ckpt_{it:08d}.pt")
    (ckpts / "ckpt_00000005.pt").unlink()  # pruned by checkpoint.keep
    (ckpts / "ckpt_00000015.pt").write_bytes(b"y")
    reporter.on_artifact("checkpoint", ckpts / "ckpt_00000015.pt")
    reporter.on_artifact("student", Path("/etc/hostname"))  # outside the job: refused
    with session_scope(service_settings.database_url) as session:
        names = session.scalars(select(Artifact.name).where(Artifact.job_id == job_id))
        assert sorted(names) == [
            "run/checkpoints/ckpt_00000010.pt",
            "run/checkpoints/ckpt_00000015.pt",
        ]


def test_a_stale_attempt_writes_nothing_once_the_job_is_claimed_again(
    service_settings: Settings, submit: Callable[..., str]
) -> None:
    """A training process frozen (SIGSTOP) while its worker died and another attempt claimed
    the job, then let go: under the very same worker name, it may write nothing for the job."""
    url = service_settings.database_url
    job_id = _claimed(service_settings, submit)
    dead = os.fork()
    if dead == 0:  # a supervisor that is gone by the time the stale process looks
        os._exit(0)
    os.waitpid(dead, 0)
    stale = _reporter(service_settings, job_id, check_seconds=0, supervisor_pid=dead)
    assert stale.may_write()  # attempt 1 still holds the job
    with session_scope(url) as session:  # presumed dead: re-queued and claimed again
        session.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)
    with session_scope(url) as session:
        assert requeue_expired(session) == [job_id]
        assert claim_job(session, job_id, worker=WORKER, lease_seconds=60).attempt == 2
    ckpt = Path(service_settings.artifacts_dir) / job_id / "run" / "checkpoints" / "ckpt_1.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"stale")

    stale.on_progress(_progress(10))
    stale.on_evaluation(10, {"AP": 0.9})
    stale.on_artifact("checkpoint", ckpt)
    assert not stale.may_write() and not stale.checkpoint_on_stop()
    # the lost lease is the stop's reason, not the supervisor that is gone too
    assert stale.should_stop() and "lease lost" in (stale.stop_reason or "")
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        assert job.iteration == 0 and job.latest_eval is None and job.attempt == 2
        assert session.scalar(select(MetricPoint.id).where(MetricPoint.job_id == job_id)) is None
        assert session.scalar(select(Artifact.id).where(Artifact.job_id == job_id)) is None
    current = _reporter(service_settings, job_id)
    current.attempt = 2
    assert current.may_write()
    current.on_artifact("checkpoint", ckpt)
    with session_scope(url) as session:
        assert session.scalar(select(Artifact.name).where(Artifact.job_id == job_id))


def test_a_new_attempt_shows_where_it_resumes_at_once(
    service_settings: Settings, submit: Callable[..., str]
) -> None:
    url = service_settings.database_url
    job_id = _claimed(service_settings, submit)
    _reporter(service_settings, job_id).on_progress(_progress(9))
    with session_scope(url) as session:
        session.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)
    with session_scope(url) as session:
        assert requeue_expired(session) == [job_id]
        assert claim_job(session, job_id, worker=WORKER, lease_seconds=60).attempt == 2
    second = _reporter(service_settings, job_id)
    second.attempt = 2
    second.on_start(total=10, start_iteration=5, out_dir=Path("unused"))
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        assert job.iteration == 5 and job.images_per_s is None and job.eta_s is None


def test_resuming_reads_only_a_checkpoint_a_current_lease_registered(
    service_settings: Settings, submit: Callable[..., str]
) -> None:
    """Each attempt writes into its own folder; the next one resumes from the newest checkpoint
    registered and unchanged since. A file a stale process wrote after losing its lease is not
    registered, so it is never read; earlier attempts' checkpoints go once a newer one is in."""
    from jobs.artifacts import ArtifactStore
    from jobs.progress import latest_checkpoint

    url = service_settings.database_url
    job_id = _claimed(service_settings, submit)
    store = ArtifactStore(service_settings.artifacts_dir)
    job_dir = store.job_dir(job_id)
    first = store.checkpoint_dir(job_id, 1)
    first.mkdir(parents=True)
    (first / "ckpt_00000005.pt").write_bytes(b"five")
    _reporter(service_settings, job_id).on_artifact("checkpoint", first / "ckpt_00000005.pt")
    (first / "ckpt_00000009.pt").write_bytes(b"nine")  # written, never registered
    with session_scope(url) as session:
        assert latest_checkpoint(session, job_id, job_dir) == (first / "ckpt_00000005.pt", 5)
    (first / "ckpt_00000005.pt").write_bytes(b"FIVE")  # same size, other bytes
    with session_scope(url) as session:
        assert latest_checkpoint(session, job_id, job_dir) is None
    (first / "ckpt_00000005.pt").write_bytes(b"five")

    with session_scope(url) as session:  # presumed dead: claimed again
        session.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)
    with session_scope(url) as session:
        assert requeue_expired(session) == [job_id]
        assert claim_job(session, job_id, worker=WORKER, lease_seconds=60).attempt == 2
    second = store.checkpoint_dir(job_id, 2)
    assert second != first
    second.mkdir(parents=True)
    (first / "best.pt").write_bytes(b"best")
    (second / "ckpt_00000007.pt").write_bytes(b"seven")
    current = _reporter(service_settings, job_id)
    current.attempt = 2
    current.on_artifact("checkpoint", second / "ckpt_00000007.pt")
    assert sorted(p.name for p in first.iterdir()) == ["best.pt"]
    with session_scope(url) as session:
        assert latest_checkpoint(session, job_id, job_dir) == (second / "ckpt_00000007.pt", 7)
        names = session.scalars(select(Artifact.name).where(Artifact.job_id == job_id))
        assert sorted(names) == ["run/checkpoints/attempt-2/ckpt_00000007.pt"]
