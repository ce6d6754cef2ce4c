"""The workers' Celery app, its process hooks and the sweeper.

`celery -A worker.celery_app worker -Q gpu-a100` (or `hmkd worker --queue gpu-a100`) starts a
worker. Its configuration lives in `jobs.broker.make_celery`, shared with the API.

The sweeper is a daemon thread of the worker's main process, so no separate beat process is
needed: every `sweep_seconds` it re-queues jobs whose lease expired (their worker died),
re-publishes queued jobs whose message never reached the broker (the outbox), and writes this
worker's heartbeat row (its queues, GPUs and current job) for the queue overview. It never
touches CUDA: the main process forks the pool, and CUDA initialised before a fork breaks the
children; GPUs are listed with `nvidia-smi -L` or read from `CUDA_VISIBLE_DEVICES`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from celery import signals
from sqlalchemy import or_, select, update

from jobs.artifacts import ArtifactStore
from jobs.broker import dispatch_pending, make_celery
from jobs.db import dispose_engines, session_scope
from jobs.gang import NODE_QUEUE_PREFIX, node_queue, reserved_for
from jobs.lifecycle import settle_waiting
from jobs.models import Job, JobState, Worker
from jobs.retention import purge_deleted
from jobs.scheduling import preempt_for_fair_share
from jobs.settings import Settings, get_settings

log = logging.getLogger(__name__)

app = make_celery(get_settings())
app.conf.include = ["worker.tasks", "worker.nodes"]


@signals.celeryd_after_setup.connect
def _consume_own_queue(sender: str, instance: Any, **_: Any) -> None:
    """Each worker also consumes a queue of its own, where a multi-node job it was reserved
    for sends its node task (`jobs.gang`)."""
    instance.app.amqp.queues.select_add(node_queue(str(sender)))


@signals.worker_process_init.connect
def _after_fork(**_: Any) -> None:
    """A pool process must not reuse database connections inherited from its parent."""
    dispose_engines()


_GPU_LINE = re.compile(r"^GPU (\d+): (.*?)(?: \(UUID: ([^)]+)\))?$")


def list_gpus() -> list[dict[str, Any]]:
    """This worker's GPUs, without initialising CUDA (which would break forked children)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    wanted = None if visible is None else [v.strip() for v in visible.split(",") if v.strip()]
    found: list[dict[str, Any]] = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "-L"], capture_output=True, text=True, timeout=10, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError) as err:
            log.warning("nvidia-smi -L failed: %s", err)
            out = ""
        for line in out.splitlines():
            m = _GPU_LINE.match(line.strip())
            if m:
                found.append({"index": int(m.group(1)), "name": m.group(2), "uuid": m.group(3)})
    if wanted is None:
        return [{"index": g["index"], "name": g["name"]} for g in found]
    gpus = []
    for i, ident in enumerate(wanted):  # CUDA renumbers the visible devices from 0
        match = next((g for g in found if ident in (str(g["index"]), g["uuid"])), None)
        gpus.append({"index": i, "name": match["name"] if match else f"GPU {ident}"})
    return gpus


def remove_orphaned_saves(settings: Settings, *, older_than_s: float) -> list[Path]:
    """Temporary files of interrupted saves in the folders of jobs that are not running.

    A running job's own process removes its orphans when it starts; this catches the jobs that
    never run again (failed, cancelled, or succeeded after a killed save).
    """
    from hmkd_core.atomic import remove_orphans

    root = Path(settings.artifacts_dir or settings.data_dir / "artifacts")
    if not root.is_dir():
        return []
    with session_scope(settings.database_url) as session:
        running = set(session.scalars(select(Job.id).where(Job.state == JobState.running.value)))
    removed: list[Path] = []
    for job_dir in root.iterdir():
        if job_dir.is_dir() and job_dir.name not in running:
            removed += remove_orphans(job_dir, older_than_s=older_than_s)
    return removed


class Sweeper:
    """The periodic duties of a worker's main process, on a daemon thread."""

    # orphaned temporary files: looked for hourly, removed once an hour old (a save in
    # progress is seconds to minutes old, never an hour)
    ORPHAN_PERIOD_S = 3600.0
    # messages of jobs no longer queued (cancelled, ended, deleted): removed every minute
    STALE_MESSAGES_PERIOD_S = 60.0

    def __init__(self, hostname: str, queues: list[str]) -> None:
        self.hostname = hostname
        self.queues = queues
        self._orphans_swept = -math.inf
        self._messages_swept = -math.inf
        self.gpus = list_gpus()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hmkd-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        settings = get_settings()
        while True:
            try:
                self.sweep_once()
            except Exception:  # a database or broker outage: try again next period
                log.exception("sweep failed; retrying in %.0f s", settings.sweep_seconds)
            if self._done.wait(settings.sweep_seconds):
                return

    def sweep_once(self) -> None:
        from jobs.lifecycle import requeue_expired
        from jobs.progress import heartbeat_worker
        from jobs.stale_messages import drop_stale_messages

        settings = get_settings()
        with session_scope(settings.database_url) as session:
            requeued = requeue_expired(session)
        if requeued:
            log.warning("re-queued jobs whose worker stopped renewing: %s", ", ".join(requeued))
        dispatch_pending(settings, app)
        with session_scope(settings.database_url) as session:
            for job_id in settle_waiting(session):
                log.warning("job %s waited for a teacher that had ended: settled now", job_id)
            for job_id in preempt_for_fair_share(
                session, self.queues, heartbeat_s=3 * settings.sweep_seconds
            ):
                log.warning("asked job %s to yield its worker for fair share", job_id)
        if time.monotonic() - self._messages_swept >= self.STALE_MESSAGES_PERIOD_S:
            self._messages_swept = time.monotonic()
            dropped = drop_stale_messages(settings)
            if dropped:
                log.info("dropped %d message(s) of jobs no longer queued", dropped)
        if time.monotonic() - self._orphans_swept >= self.ORPHAN_PERIOD_S:
            self._orphans_swept = time.monotonic()
            for path in remove_orphaned_saves(settings, older_than_s=self.ORPHAN_PERIOD_S):
                log.warning("removed %s, left by an interrupted save", path)
            if settings.artifacts_dir is not None:
                for path in purge_deleted(ArtifactStore(settings.artifacts_dir)):
                    log.warning("removed %s, left by an interrupted deletion", path)
        with session_scope(settings.database_url) as session:
            current = session.scalar(
                select(Job.id).where(
                    Job.state == JobState.running.value,
                    Job.lease_owner.startswith(f"{self.hostname}#", autoescape=True),
                )
            ) or reserved_for(session, self.hostname)
            heartbeat_worker(
                session,
                name=self.hostname,
                queues=self.queues,
                gpus=self.gpus,
                current_job_id=current,
            )


_sweeper: Sweeper | None = None


@signals.worker_ready.connect
def _start_sweeper(sender: Any = None, **_: Any) -> None:
    global _sweeper
    hostname = getattr(sender, "hostname", None) or "worker"
    queues = sorted(
        q
        for q in (app.amqp.queues.consume_from or app.amqp.queues)
        if not q.startswith(NODE_QUEUE_PREFIX)
    )
    _sweeper = Sweeper(hostname, queues)
    with session_scope(get_settings().database_url) as session:  # a restart under its name
        session.execute(update(Worker).where(Worker.name == hostname).values(draining=False))
    _sweeper.start()
    log.info("sweeper started for %s on queues %s (GPUs: %s)", hostname, queues, _sweeper.gpus)


@signals.worker_shutdown.connect
def _stop_sweeper(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()


def release_jobs_of(settings: Settings, hostname: str) -> list[str]:
    """Ask every job this worker runs to checkpoint and come back to the queue: what a
    deploy, `docker stop` or a spot reclaim's SIGTERM does. Celery's warm shutdown then waits
    for the tasks, which end as soon as their training has checkpointed (seconds); a training
    that outlives the shutdown's grace is killed, and its job resumes from its last periodic
    checkpoint once the lease runs out."""
    from jobs.lifecycle import Conflict, request_preemption
    from jobs.models import Worker

    released = []
    with session_scope(settings.database_url) as session:
        # a message it still takes while draining is handed back, not run (`execute_job`)
        row = session.get(Worker, hostname)
        if row is not None:
            row.draining = True
        # the jobs it leads, and those it is a node of: a multi-node job checkpoints and
        # requeues as a whole when any of its workers goes
        node_of = reserved_for(session, hostname)
        for job in session.scalars(
            select(Job).where(
                Job.state == JobState.running.value,
                or_(
                    Job.lease_owner.startswith(f"{hostname}#", autoescape=True),
                    Job.id == node_of,
                ),
            )
        ):
            try:
                request_preemption(session, job, f"worker {hostname} is shutting down")
            except Conflict:
                continue
            released.append(job.id)
    return released


@signals.worker_shutting_down.connect
def _release_on_shutdown(sender: Any = None, sig: str = "", how: str = "", **_: Any) -> None:
    if how == "Cold":  # a second signal: the operator wants it gone now
        return
    hostname = str(sender or (_sweeper.hostname if _sweeper else "worker"))

    def release() -> None:
        for attempt in range(3):  # a busy database (SQLite's lock) gets two more tries
            try:
                released = release_jobs_of(get_settings(), hostname)
                break
            except Exception:  # the database may be what is going away
                log.exception(
                    "could not ask this worker's jobs to checkpoint (try %d)", attempt + 1
                )
                time.sleep(1.0)
        else:
            return
        if released:
            log.warning("%s (%s): jobs %s checkpoint and go back to the queue", sig, how, released)

    # out of the signal handler: a database call must not run inside one
    threading.Thread(target=release, name="hmkd-release", daemon=False).start()
