"""End to end with real worker processes on the real backends: a job goes through the broker
to a `celery worker`, which claims it, spawns training and records the outcome.

Run with `-s` (`pytest -s -k latency`) to see the measured submit-to-run latencies.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from hmkd_core.models import load_student
from jobs.broker import dispatch_job, dispatch_pending, make_celery, publish
from jobs.db import session_scope
from jobs.lifecycle import claim_job, request_cancel, requeue_expired, retry_job
from jobs.models import Artifact, Job, JobEvent, JobState, MetricPoint, Worker, utcnow
from jobs.settings import Settings
from tests.worker.conftest import job_row, wait_for
from worker.tasks import execute_job

DOWN = "redis://127.0.0.1:1/0"
NO_VAL = {"val": None}  # skips the final evaluation where a test does not need it


def _events(settings: Settings, job_id: str) -> list[tuple[str, str, int]]:
    with session_scope(settings.database_url) as session:
        rows = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        )
        return [(e.kind, e.message, e.attempt) for e in rows]


def _artifacts(settings: Settings, job_id: str) -> dict[str, str]:
    with session_scope(settings.database_url) as session:
        rows = session.scalars(select(Artifact).where(Artifact.job_id == job_id))
        return {a.name: a.kind for a in rows}


def _state_is(settings: Settings, job_id: str, *states: str) -> Callable[[], Job | None]:
    def check() -> Job | None:
        job = job_row(settings, job_id)
        return job if job.state in states else None

    return check


def _worker_ready(settings: Settings, hostname: str) -> Callable[[], bool]:
    def check() -> bool:
        with session_scope(settings.database_url) as session:
            return session.get(Worker, hostname) is not None

    return check


def _finished(settings: Settings, job_id: str, timeout: float) -> Job:
    job = wait_for(
        _state_is(settings, job_id, "succeeded", "failed", "cancelled"), timeout, "job end"
    )
    return job


def _resume_gap(settings: Settings, job_id: str) -> tuple[int, int]:
    """(last iteration attempt 1 reported, iteration attempt 2 resumed from)."""
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(
                MetricPoint.attempt,
                func.min(MetricPoint.iteration),
                func.max(MetricPoint.iteration),
            )
            .where(MetricPoint.job_id == job_id)
            .group_by(MetricPoint.attempt)
        ).all()
    by_attempt = {attempt: (lo, hi) for attempt, lo, hi in rows}
    return by_attempt[1][1], by_attempt[2][0] - 1


def test_job_runs_to_success_and_its_student_loads(
    service_settings: Settings, submit: Callable[..., str], start_worker: Callable[..., Any]
) -> None:
    worker = start_worker("w1")
    wait_for(_worker_ready(service_settings, "w1@test"), 60, "the worker's first heartbeat")
    job_id = submit("success")  # 4 iterations, with the final evaluation
    submitted = time.monotonic()
    assert dispatch_pending(service_settings) == 1
    wait_for(_state_is(service_settings, job_id, "running", "succeeded"), 30, "the claim", 0.02)
    claimed = time.monotonic() - submitted
    wait_for(lambda: job_row(service_settings, job_id).iteration >= 1, 60, "the first iteration")
    first_iteration = time.monotonic() - submitted
    job = _finished(service_settings, job_id, 120)
    print(
        f"\n[{service_settings.broker_url.split(':')[0]}] submit->running {claimed:.2f} s, "
        f"submit->first iteration {first_iteration:.2f} s, "
        f"submit->succeeded {time.monotonic() - submitted:.2f} s"
    )
    assert job.state == JobState.succeeded, (job.error, worker.log()[-3000:])
    assert job.attempt == 1 and job.iteration == 4 and job.error is None
    assert job.latest_eval is not None
    artifacts = _artifacts(service_settings, job_id)
    assert artifacts["run/student.pt"] == "student" and artifacts["logs.txt"] == "logs"
    assert "run/eval.json" in artifacts
    assert any(kind == "checkpoint" for kind in artifacts.values())
    student = Path(service_settings.artifacts_dir) / job_id / "run" / "student.pt"
    model, header = load_student(student)
    assert header.num_classes > 0 and model is not None
    logs = (Path(service_settings.artifacts_dir) / job_id / "logs.txt").read_text()
    assert "attempt 1 claimed by w1@test" in logs and "attempt ends succeeded" in logs
    assert "data.train: " in logs and "box sizes at the model's input" in logs
    assert "iteration 4/4  loss " in logs and "evaluation at iteration 4: AP " in logs
    with session_scope(service_settings.database_url) as session:
        row = session.get(Worker, "w1@test")
        assert row is not None and row.queues == [service_settings.default_queue]


def test_the_same_message_twice_runs_once(
    service_settings: Settings, submit: Callable[..., str], start_worker: Callable[..., Any]
) -> None:
    job_id = submit("twice", schedule={"iterations": 2}, data=NO_VAL)
    app = make_celery(service_settings)
    assert dispatch_pending(service_settings, app) == 1
    publish(app, job_row(service_settings, job_id))  # a redelivery / a second publisher
    app.close()
    start_worker("w1")
    job = _finished(service_settings, job_id, 120)
    assert job.state == JobState.succeeded and job.attempt == 1
    wait_for(
        lambda: any(k == "delivery_ignored" for k, _, _ in _events(service_settings, job_id)),
        30,
        "the second delivery to be ignored",
    )
    kinds = [k for k, _, _ in _events(service_settings, job_id)]
    assert kinds.count("claimed") == 1 and kinds.count("succeeded") == 1


def test_broker_down_at_submit_then_back(
    service_settings: Settings, submit: Callable[..., str], start_worker: Callable[..., Any]
) -> None:
    job_id = submit("outage", schedule={"iterations": 2}, data=NO_VAL)
    down = service_settings.model_copy(update={"broker_url": DOWN})
    assert dispatch_pending(down) == 0  # the API's publish failed: logged, job kept
    assert not job_row(service_settings, job_id).dispatched
    assert dispatch_pending(service_settings) == 1  # the broker is back: the outbox drains
    start_worker("w1", via_cli=True)  # as `hmkd worker` starts one
    job = _finished(service_settings, job_id, 120)
    assert job.state == JobState.succeeded and job.attempt == 1


@pytest.mark.slow
def test_cancel_while_running(
    service_settings: Settings, submit: Callable[..., str], start_worker: Callable[..., Any]
) -> None:
    job_id = submit("cancel", schedule={"iterations": 400}, runtime={"log_every": 1}, data=NO_VAL)
    dispatch_pending(service_settings)
    start_worker("w1")
    wait_for(lambda: job_row(service_settings, job_id).iteration >= 2, 90, "training to run")
    with session_scope(service_settings.database_url) as session:
        request_cancel(session, session.get(Job, job_id))
    asked = time.monotonic()
    job = _finished(service_settings, job_id, 30)
    print(f"\ncancel seen and job ended in {time.monotonic() - asked:.2f} s")
    assert job.state == JobState.cancelled and job.iteration < 400
    assert time.monotonic() - asked < 15
    artifacts = _artifacts(service_settings, job_id)
    assert "logs.txt" in artifacts
    assert any(kind == "checkpoint" for kind in artifacts.values()), "a stop checkpoints"


@pytest.mark.slow
def test_a_worker_that_lost_its_lease_stops_training_and_leaves_the_job(
    service_settings: Settings, submit: Callable[..., str], start_worker: Callable[..., Any]
) -> None:
    job_id = submit("stolen", schedule={"iterations": 400}, data=NO_VAL)
    dispatch_pending(service_settings)
    worker = start_worker("w1")
    wait_for(lambda: job_row(service_settings, job_id).iteration >= 2, 90, "training to run")
    with session_scope(service_settings.database_url) as session:  # presumed dead, taken over
        session.get(Job, job_id).lease_owner = "w2@test#1"
    wait_for(lambda: "'lease_lost'" in worker.log(), 30, "the task to give the job up")
    job = job_row(service_settings, job_id)
    assert job.state == JobState.running and job.lease_owner == "w2@test#1"
    assert job.iteration < 400 and job.finished_at is None
    logs = (Path(service_settings.artifacts_dir) / job_id / "logs.txt").read_text()
    assert "stopping: lease lost" in logs and "left to its new owner" in logs


@pytest.mark.slow
def test_killed_worker_resumes_from_its_checkpoint_on_a_new_worker(
    service_settings: Settings, submit: Callable[..., str], start_worker: Callable[..., Any]
) -> None:
    every = 5
    job_id = submit(
        "crash",
        schedule={"iterations": 14},
        checkpoint={"every": every},
        runtime={"log_every": 1},
        data=NO_VAL,
    )
    dispatch_pending(service_settings)
    first = start_worker("w1")
    ckpt = f"run/checkpoints/attempt-1/ckpt_{every:08d}.pt"
    wait_for(lambda: ckpt in _artifacts(service_settings, job_id), 120, "the first checkpoint")
    wait_for(lambda: job_row(service_settings, job_id).iteration >= every + 3, 60, "progress")
    first.kill(signal.SIGKILL)  # the node is gone: worker, pool and training process
    killed_at = time.monotonic()
    reported_before_kill = job_row(service_settings, job_id).iteration
    start_worker("w2")
    wait_for(lambda: job_row(service_settings, job_id).attempt == 2, 60, "the second claim")
    reclaimed = time.monotonic() - killed_at
    job = _finished(service_settings, job_id, 150)
    print(
        f"\nkilled at iteration {reported_before_kill} (lease {service_settings.lease_seconds:.0f}"
        f" s): claimed again after {reclaimed:.1f} s, done after "
        f"{time.monotonic() - killed_at:.1f} s"
    )
    assert job.state == JobState.succeeded, job.error
    assert job.attempt == 2 and job.iteration == 14
    kinds = [k for k, _, _ in _events(service_settings, job_id)]
    assert "lease_expired" in kinds and kinds.count("claimed") == 2
    last_before, resumed_from = _resume_gap(service_settings, job_id)
    print(
        f"checkpoint every {every}: attempt 1 reached {last_before}, attempt 2 resumed from "
        f"{resumed_from}: {last_before - resumed_from} iterations lost"
    )
    assert resumed_from >= every, "the second attempt must resume, not start over"
    assert last_before - resumed_from < every + 2
    logs = (Path(service_settings.artifacts_dir) / job_id / "logs.txt").read_text()
    assert "attempt 1 claimed by w1@test" in logs and "attempt 2 claimed by w2@test" in logs
    assert f"resuming from {ckpt}" in logs or "resuming from run/checkpoints/attempt-1/" in logs
    # the second attempt wrote its own folder; the first's checkpoints went once it had one
    run = Path(service_settings.artifacts_dir) / job_id / "run" / "checkpoints"
    assert not list((run / "attempt-1").glob("ckpt_*.pt"))
    assert list((run / "attempt-2").glob("ckpt_*.pt"))


@pytest.mark.slow
def test_a_failing_or_killed_training_process_fails_the_job_and_keeps_logs(
    service_settings: Settings,
    submit: Callable[..., str],
    start_worker: Callable[..., Any],
    digits: dict[str, Path],
) -> None:
    # Images spoilt after the submit check read their headers (the pixels cut short, as a
    # copy still being written leaves them): hmkd_core raises inside the child when it
    # decodes them.
    spoilt = service_settings.dataset_roots[0] / "spoilt"
    shutil.copytree(digits["train_images"], spoilt / "images")
    shutil.copy(digits["train_annotations"], spoilt / "train.json")
    data = {"train": {"images": str(spoilt / "images"), "annotations": str(spoilt / "train.json")}}
    raising = submit("raises", data={**data, **NO_VAL})
    for image in (spoilt / "images").iterdir():
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    oom = submit("oom", schedule={"iterations": 400}, checkpoint={"every": 2}, data=NO_VAL)
    dispatch_pending(service_settings)
    worker = start_worker("w1")
    job = _finished(service_settings, raising, 90)
    assert job.state == JobState.failed, worker.log()[-3000:]
    assert "cannot decode" in job.error and "Traceback" not in job.error
    assert "/" not in job.error.split(":", 1)[0] and len(job.error.splitlines()) == 1
    assert "logs.txt" in _artifacts(service_settings, raising)
    logs = (Path(service_settings.artifacts_dir) / raising / "logs.txt").read_text()
    assert "cannot decode" in logs and "Traceback" in logs

    # The OOM killer's way: SIGKILL to the training process. The worker survives and says so.
    wait_for(lambda: job_row(service_settings, oom).iteration >= 3, 90, "the second job to run")
    log_path = Path(service_settings.artifacts_dir) / oom / "logs.txt"
    pid = int(re.search(r"training process pid (\d+)", log_path.read_text()).group(1))
    os.kill(pid, signal.SIGKILL)
    job = _finished(service_settings, oom, 30)
    assert job.state == JobState.failed and "SIGKILL" in job.error
    assert any(kind == "checkpoint" for kind in _artifacts(service_settings, oom).values())
    assert worker.proc.poll() is None, "the worker outlives its training process"


@pytest.mark.slow
def test_jobs_start_in_the_order_the_queue_shows_on_every_broker(
    service_settings: Settings, submit: Callable[..., str], start_worker: Callable[..., Any]
) -> None:
    """The SQLAlchemy broker is first in, first out and knows no priorities; the low-priority
    job's message is delivered first, yet the job shown first in line starts first."""
    low = submit("low", data=NO_VAL)
    high = submit("high", resources={"priority": 9}, data=NO_VAL)
    assert job_row(service_settings, high).priority == 9
    for job_id in (low, high):  # the low one's message goes out first
        assert dispatch_job(service_settings, job_id)
    start_worker("w1")
    first, second = (_finished(service_settings, j, 120) for j in (high, low))
    assert first.state == second.state == JobState.succeeded
    assert first.started_at < second.started_at


@pytest.mark.slow
def test_a_job_past_its_max_runtime_checkpoints_fails_and_a_retry_resumes(
    service_settings: Settings, submit: Callable[..., str], start_worker: Callable[..., Any]
) -> None:
    job_id = submit(
        "slow",
        schedule={"iterations": 100000},
        checkpoint={"every": 100000},
        resources={"max_runtime_s": 4},
        data=NO_VAL,
    )
    dispatch_pending(service_settings)
    start_worker("w1")
    job = _finished(service_settings, job_id, 120)
    assert job.state == JobState.failed, job.error
    assert "max_runtime_s (4 s)" in job.error and "retry resumes" in job.error
    stopped_at = job.iteration
    assert 0 < stopped_at < 100000
    ckpt = f"run/checkpoints/attempt-1/ckpt_{stopped_at:08d}.pt"
    assert _artifacts(service_settings, job_id).get(ckpt) == "checkpoint"
    with session_scope(service_settings.database_url) as session:
        retry_job(session, session.get(Job, job_id))
    dispatch_pending(service_settings)
    wait_for(lambda: job_row(service_settings, job_id).attempt == 2, 60, "the retry's claim")
    job = _finished(service_settings, job_id, 120)
    assert job.state == JobState.failed and job.iteration > stopped_at
    logs = (Path(service_settings.artifacts_dir) / job_id / "logs.txt").read_text()
    assert f"resuming from {ckpt}" in logs


def test_a_job_that_keeps_losing_its_worker_stops_after_max_attempts(
    service_settings: Settings, submit: Callable[..., str]
) -> None:
    url = service_settings.database_url
    expired = submit("expired")
    queued = submit("queued")
    with session_scope(url) as session:
        for job_id, state in ((expired, "running"), (queued, "queued")):
            job = session.get(Job, job_id)
            job.state, job.attempt = state, job.max_attempts
            job.lease_owner, job.lease_expires_at = "gone#1", utcnow()
    with session_scope(url) as session:  # the sweeper finds the dead worker's job
        assert requeue_expired(session) == []
    # A message for an exhausted job: the task's claim ends it instead of running it again.
    assert execute_job(service_settings, queued, "w9#1") == "duplicate"
    for job_id in (expired, queued):
        job = job_row(service_settings, job_id)
        assert job.state == JobState.failed
        assert f"stopped after {job.max_attempts} attempts" in job.error
    with session_scope(url) as session:
        assert claim_job(session, expired, worker="w9#1", lease_seconds=6) is None


@pytest.mark.slow
def test_a_preempted_job_checkpoints_requeues_and_resumes_without_using_an_attempt(
    service_settings: Settings, submit: Callable[..., str], start_worker: Callable[..., Any]
) -> None:
    from jobs.lifecycle import request_preemption

    job_id = submit(
        "preempted",
        schedule={"iterations": 80},
        checkpoint={"every": 1000},  # no periodic checkpoint: only the preemption's
        runtime={"log_every": 1},
        data=NO_VAL,
    )
    dispatch_pending(service_settings)
    start_worker("w1")
    wait_for(lambda: job_row(service_settings, job_id).iteration >= 3, 90, "training to run")
    with session_scope(service_settings.database_url) as session:
        request_preemption(session, session.get(Job, job_id), "test")
    job = _finished(service_settings, job_id, 150)
    assert job.state == JobState.succeeded, job.error
    assert (job.attempt, job.max_attempts) == (2, service_settings.max_attempts + 1)
    kinds = [k for k, _, _ in _events(service_settings, job_id)]
    assert kinds.count("claimed") == 2 and "preempted" in kinds and "lease_expired" not in kinds
    reached, resumed = _resume_gap(service_settings, job_id)
    print(f"\npreempted: attempt 1 reached {reached}, attempt 2 resumed from {resumed}")
    assert resumed >= 3 and reached - resumed <= 1  # at most one iteration lost


@pytest.mark.slow
def test_sigterm_checkpoints_and_releases_the_job_for_another_worker(
    service_settings: Settings, submit: Callable[..., str], start_worker: Callable[..., Any]
) -> None:
    job_id = submit(
        "deploy",
        schedule={"iterations": 80},
        checkpoint={"every": 1000},
        runtime={"log_every": 1},
        data=NO_VAL,
    )
    dispatch_pending(service_settings)
    first = start_worker("w1")
    wait_for(lambda: job_row(service_settings, job_id).iteration >= 3, 90, "training to run")
    os.kill(first.proc.pid, signal.SIGTERM)  # what `docker stop` sends the main process
    first.proc.wait(timeout=60)  # a warm shutdown: it waits for the job to checkpoint and go
    job = job_row(service_settings, job_id)
    assert job.state == JobState.queued and job.attempt == 1, (job.state, first.log()[-3000:])
    events = _events(service_settings, job_id)
    assert any(k == "preempt_requested" and "shutting down" in m for k, m, _ in events)
    start_worker("w2")
    job = _finished(service_settings, job_id, 150)
    assert job.state == JobState.succeeded and job.attempt == 2
    assert job.max_attempts == service_settings.max_attempts + 1  # the release used no attempt
    reached, resumed = _resume_gap(service_settings, job_id)
    assert reached - resumed <= 1


@pytest.mark.slow
def test_with_object_storage_a_job_resumes_on_another_machine_from_the_bucket(
    s3_settings: Settings, submit: Callable[..., str], tmp_path: Path
) -> None:
    """Two workers that share no disk (each its own artifacts folder) and one bucket: the
    second resumes from the checkpoint the first published, and what the job leaves (student,
    logs of both attempts) is in the bucket, where the API reads it."""
    from jobs.artifacts import store_of
    from jobs.storage import storage_of
    from tests.worker.conftest import WorkerProcess

    every = 5
    job_id = submit(
        "s3", schedule={"iterations": 14}, checkpoint={"every": every}, runtime={"log_every": 1}
    )
    dispatch_pending(s3_settings)
    machines = [
        s3_settings.model_copy(update={"artifacts_dir": tmp_path / f"disk-{n}"}) for n in (1, 2)
    ]
    workers = []
    try:
        workers.append(WorkerProcess(machines[0], "m1@test", tmp_path, via_cli=False))
        ckpt = f"run/checkpoints/attempt-1/ckpt_{every:08d}.pt"
        wait_for(lambda: ckpt in _artifacts(s3_settings, job_id), 120, "the first checkpoint")
        assert storage_of(s3_settings).size(job_id, ckpt) is not None, "published as written"
        wait_for(lambda: job_row(s3_settings, job_id).iteration >= every + 2, 60, "progress")
        workers[0].kill(signal.SIGKILL)
        workers.append(WorkerProcess(machines[1], "m2@test", tmp_path, via_cli=False))
        job = _finished(s3_settings, job_id, 150)
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.kill(signal.SIGKILL)
    assert job.state == JobState.succeeded, (job.error, workers[-1].log()[-3000:])
    assert job.attempt == 2 and job.iteration == 14
    last_before, resumed_from = _resume_gap(s3_settings, job_id)
    assert resumed_from >= every, "the second machine must resume from the bucket"
    assert last_before - resumed_from < every + 2
    api = store_of(s3_settings)  # a third machine: nothing of the job on its disk
    assert not (api.root / job_id).exists()
    with session_scope(s3_settings.database_url) as session:
        rows = {
            a.name: a for a in session.scalars(select(Artifact).where(Artifact.job_id == job_id))
        }
    for name in ("run/student.pt", "run/eval.json", "logs.txt"):
        assert api.fetch(job_id, name), name
        assert api.sha256(api.resolve(job_id, name)) == rows[name].sha256, name
    logs = api.resolve(job_id, "logs.txt").read_text()
    assert "attempt 1 claimed by m1@test" in logs and "attempt 2 claimed by m2@test" in logs
    assert "resuming from run/checkpoints/attempt-1/ckpt_" in logs
    assert not any("attempt-1/ckpt_" in name for name in rows)  # pruned, here and in the bucket
    assert storage_of(s3_settings).size(job_id, ckpt) is None
