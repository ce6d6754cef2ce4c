"""`hmkd worker`: start a worker process serving named queues.

One worker runs one job at a time (concurrency 1, prefetch 1, fair scheduling): a job owns the
worker's GPUs for hours, and a second job on the same GPUs would starve both. Run one worker
per GPU set (`CUDA_VISIBLE_DEVICES=0,1 hmkd worker --queue gpu-a100`). Gossip and mingle are off:
workers coordinate through the database (leases), not through broadcast messages, which the
embedded SQLAlchemy broker does not carry anyway.
"""

from __future__ import annotations

import logging
import os
import re
import socket

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}(@[A-Za-z0-9][A-Za-z0-9_.\-]{0,199})?$")


def worker_name(given: str | None = None) -> str:
    """The worker's node name: `given`, else `$HMKD_WORKER_NAME`, else `hmkd-<pid>@<host>`.

    Celery's default, `celery@<host>`, is the same for every worker of a machine: two workers
    on one host would register as one, and the death of either would go unseen. A name without
    `@host` gets this machine's host name appended.
    """
    name = given or os.environ.get("HMKD_WORKER_NAME") or f"hmkd-{os.getpid()}"
    if not _NAME.match(name):
        raise ValueError(
            f"worker name {name!r}: use letters, digits, '.', '_' and '-', optionally @host"
        )
    return name if "@" in name else f"{name}@{socket.gethostname()}"


def worker_argv(
    queues: list[str], *, concurrency: int = 1, loglevel: str = "info", hostname: str | None = None
) -> list[str]:
    """The `celery worker` arguments `run_worker` uses (also what a Dockerfile would run)."""
    if not queues:
        raise ValueError("name at least one queue to serve, e.g. --queue default")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    argv = [
        "worker",
        "-Q",
        ",".join(queues),
        "--concurrency",
        str(concurrency),
        "--pool",
        "prefork",
        "-O",
        "fair",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        loglevel,
    ]
    if hostname:
        argv += ["--hostname", hostname]
    return argv


def run_worker(
    queues: list[str], *, concurrency: int = 1, loglevel: str = "info", hostname: str | None = None
) -> None:
    """Run a worker in this process until it is stopped (SIGTERM: finish the job, then exit).

    `concurrency` above 1 runs that many jobs side by side on the same devices: only sensible
    for CPU workers.
    """
    from worker.celery_app import app

    if concurrency > 1:
        log.warning("concurrency %d: jobs on this worker share its GPUs", concurrency)
    app.worker_main(
        worker_argv(queues, concurrency=concurrency, loglevel=loglevel, hostname=hostname)
    )
