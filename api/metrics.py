"""`GET /metrics`: the service in Prometheus text format, for scraping without a token.

Jobs run in worker processes on other machines, so counters kept in this process would know
nothing of them. Job, queue and worker figures are therefore read from the database at scrape
time by `JobCollector`, one short aggregate query per family; only the API's own request
latency is measured here, by `RequestMetrics`, labelled with the route template
(`/v1/jobs/{job_id}`) so that ids do not turn into one time series each.

Each app has its own `CollectorRegistry`: the global one would refuse a second app's metrics
(tests build many apps) and would mix in process metrics nobody asked for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, extract, func, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.db import session_scope
from jobs.models import TERMINAL, Job, JobState, Team, Worker
from jobs.retention import disk_by_team
from jobs.settings import Settings

log = logging.getLogger(__name__)

UNMATCHED_ROUTE = "<unmatched>"  # 404s for arbitrary paths share one series
# and methods a client makes up (any token is a method to HTTP) share one too
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "<other>"


def _utc(t: datetime) -> datetime:
    """SQLite hands back naive datetimes; they were written as UTC."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _seconds_between(
    session: Session, later: ColumnElement[Any], earlier: ColumnElement[Any]
) -> ColumnElement[Any]:
    """`later - earlier` in seconds, computed by the database so a sum over every finished
    job is one row, not a table scan into Python. SQLite has no interval type."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(later) - func.julianday(earlier)) * 86400.0
    return extract("epoch", later - earlier)


class JobCollector(Collector):
    """Job, queue and worker gauges, read from the database on every scrape.

    A scrape whose queries fail still answers, with `hmkd_metrics_database_up 0`, so an alert
    can tell "the database is down" from "the API is down".
    """

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def describe(self) -> Iterable[Metric]:
        # Names without samples: registering the collector must not query the database.
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "hmkd_metrics_database_up", "1 when the job figures below could be read."
        )
        try:
            with session_scope(self.database_url) as session:
                families = list(self._families(session, datetime.now(UTC)))
        except Exception as err:  # an unreachable database must not turn a scrape into a 500
            log.warning("metrics: database query failed: %s", err)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from families

    def _families(self, session: Session, now: datetime) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("hmkd_jobs", "Jobs by state and queue.", labels=["state", "queue"])
        counts: dict[str, dict[str, int]] = {}
        for state, queue, n in session.execute(
            select(Job.state, Job.queue, func.count()).group_by(Job.state, Job.queue)
        ):
            counts.setdefault(queue, {})[state] = n
        for queue, by_state in sorted(counts.items()):
            for state in JobState:  # zeros too: a series that vanishes reads as "no data"
                jobs.add_metric([state.value, queue], float(by_state.get(state.value, 0)))
        yield jobs

        disk = GaugeMetricFamily(
            "hmkd_team_disk_bytes", "Bytes of the artifacts each team's jobs keep.", labels=["team"]
        )
        names = dict(session.execute(select(Team.id, Team.name)).all())
        for team_id, used in sorted(disk_by_team(session).items()):
            disk.add_metric([names.get(team_id, str(team_id))], float(used))
        yield disk

        oldest = GaugeMetricFamily(
            "hmkd_queue_oldest_wait_seconds",
            "Age of the oldest queued job per queue, since submission.",
            labels=["queue"],
        )
        for queue, created in session.execute(
            select(Job.queue, func.min(Job.created_at))
            .where(Job.state == JobState.queued.value)
            .group_by(Job.queue)
        ):
            oldest.add_metric([queue], max(0.0, (now - _utc(created)).total_seconds()))
        yield oldest

        wait = SummaryMetricFamily(
            "hmkd_job_queue_wait_seconds",
            "Time from submission to first start, over every job that started.",
            labels=["queue"],
        )
        for queue, n, total in session.execute(
            select(
                Job.queue,
                func.count(),
                func.sum(_seconds_between(session, Job.started_at, Job.created_at)),
            )
            .where(Job.started_at.is_not(None))
            .group_by(Job.queue)
        ):
            wait.add_metric([queue], count_value=n, sum_value=float(total or 0.0))
        yield wait

        duration = SummaryMetricFamily(
            "hmkd_job_duration_seconds",
            "Time from first start to the end, over every finished job that started.",
            labels=["queue", "state"],
        )
        for queue, state, n, total in session.execute(
            select(
                Job.queue,
                Job.state,
                func.count(),
                func.sum(_seconds_between(session, Job.finished_at, Job.started_at)),
            )
            .where(
                Job.state.in_([s.value for s in TERMINAL]),
                Job.started_at.is_not(None),
                Job.finished_at.is_not(None),
            )
            .group_by(Job.queue, Job.state)
        ):
            duration.add_metric([queue, state], count_value=n, sum_value=float(total or 0.0))
        yield duration

        heartbeat = GaugeMetricFamily(
            "hmkd_worker_heartbeat_age_seconds",
            "Seconds since each worker's last heartbeat; a growing value is a dead worker.",
            labels=["worker"],
        )
        for name, beat in session.execute(select(Worker.name, Worker.heartbeat_at)):
            heartbeat.add_metric([name], max(0.0, (now - _utc(beat)).total_seconds()))
        yield heartbeat

        speed = GaugeMetricFamily(
            "hmkd_job_images_per_second",
            "Training throughput of each running job, as last reported.",
            labels=["job_id", "queue"],
        )
        for job_id, queue, ips in session.execute(
            select(Job.id, Job.queue, Job.images_per_s).where(
                Job.state == JobState.running.value, Job.images_per_s.is_not(None)
            )
        ):
            speed.add_metric([job_id, queue], float(ips))
        yield speed


class RequestMetrics:
    """ASGI middleware: observes each HTTP request's duration, by method, route template and
    status. The route is read from the scope after routing, where FastAPI leaves it."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client sees if the app raises before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope.get("method", "")
            self.histogram.labels(
                method=method if method in METHODS else OTHER_METHOD,
                route=route_template(scope),
                status=str(status),
            ).observe(time.perf_counter() - start)


def route_template(scope: Scope) -> str:
    """The matched route's template with the prefixes it was included under, e.g.
    `/v1/jobs/{job_id}` for `/v1/jobs/3f2a...`; `<unmatched>` when no route matched.

    FastAPI leaves the matched route in `scope["route"]`, but depending on its version that
    route's `path` holds the include prefix (`/v1`) or not. The prefix is recovered as the part
    of the request path before where the route's own pattern matches it in full; prefixes are
    literal here, so this adds no per-request label values.
    """
    route = scope.get("route")
    fmt = getattr(route, "path_format", None)
    regex = getattr(route, "path_regex", None)
    if not isinstance(fmt, str):
        return UNMATCHED_ROUTE
    path: str = scope.get("path", "")
    if regex is None or regex.match(path):
        return fmt
    cut = path.find("/", 1)
    while cut != -1:
        if regex.match(path[cut:]):
            return path[:cut] + fmt
        cut = path.find("/", cut + 1)
    return fmt  # the route matched some other way: its own template is still bounded


def install_metrics(app: FastAPI, settings: Settings) -> CollectorRegistry:
    """Give `app` its registry, the request-latency middleware and `GET /metrics`."""
    registry = CollectorRegistry()
    histogram = Histogram(
        "hmkd_api_request_duration_seconds",
        "API request duration, from the request to the end of the response body.",
        labelnames=["method", "route", "status"],
        registry=registry,
    )
    registry.register(JobCollector(settings.database_url))
    app.state.metrics_registry = registry
    app.add_middleware(RequestMetrics, histogram=histogram)

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        """Prometheus text format; no token, like the health probes (it names no tokens and
        no specs, only counts, queue names, job ids and worker names)."""
        data = generate_latest(request.app.state.metrics_registry)
        return Response(content=data, media_type=CONTENT_TYPE_LATEST)

    return registry
