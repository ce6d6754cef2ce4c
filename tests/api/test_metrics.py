"""`GET /metrics`: job figures read from the database at scrape time, and request latency by
route template, in Prometheus text format, without a token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from jobs.db import session_scope
from jobs.lifecycle import claim_job
from jobs.progress import heartbeat_worker, record_progress
from jobs.settings import Settings
from tests.api.conftest import job_spec, run_to_end, submit


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value of every sample in a scrape."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _get(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_metrics_count_jobs_speed_workers_and_requests(
    app: FastAPI,
    client: TestClient,
    dataset: dict[str, Path],
    service_settings: Settings,
    admin: tuple[Any, str],
) -> None:
    running = submit(client, job_spec(dataset, name="a"))["id"]
    submit(client, job_spec(dataset, name="b"))
    done = submit(client, job_spec(dataset, name="c", resources={"queue": "gpu-a"}))["id"]
    run_to_end(service_settings, done)
    with session_scope(service_settings.database_url) as session:
        assert claim_job(session, running, worker="w#2", lease_seconds=60) is not None
    with session_scope(service_settings.database_url) as session:
        record_progress(
            session,
            running,
            worker="w#2",
            attempt=1,
            iteration=3,
            total=10,
            images_per_s=12.5,
            eta_s=7.0,
            lr=0.01,
            losses={"loss": 1.0},
        )
        heartbeat_worker(session, name="w#2", queues=["default"], gpus=[], current_job_id=running)
    assert client.get(f"/v1/jobs/{running}").status_code == 200
    assert client.get(f"/v1/jobs/{running}/artifacts/run/student.pt").status_code == 404

    with TestClient(app) as anonymous:  # no Authorization header
        r = anonymous.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    s = _samples(r.text)

    assert _get(s, "hmkd_metrics_database_up") == 1.0
    assert _get(s, "hmkd_jobs", state="queued", queue="default") == 1.0
    assert _get(s, "hmkd_jobs", state="running", queue="default") == 1.0
    assert _get(s, "hmkd_jobs", state="succeeded", queue="default") == 0.0
    assert _get(s, "hmkd_jobs", state="succeeded", queue="gpu-a") == 1.0
    assert _get(s, "hmkd_jobs", state="queued", queue="gpu-a") == 0.0
    assert _get(s, "hmkd_job_images_per_second", job_id=running, queue="default") == 12.5
    assert _get(s, "hmkd_queue_oldest_wait_seconds", queue="default") is not None
    assert _get(s, "hmkd_queue_oldest_wait_seconds", queue="gpu-a") is None  # nothing waits
    assert _get(s, "hmkd_job_queue_wait_seconds_count", queue="default") == 1.0
    assert _get(s, "hmkd_job_duration_seconds_count", queue="gpu-a", state="succeeded") == 1.0
    duration = _get(s, "hmkd_job_duration_seconds_sum", queue="gpu-a", state="succeeded")
    assert duration is not None and 0.0 <= duration < 60.0
    age = _get(s, "hmkd_worker_heartbeat_age_seconds", worker="w#2")
    assert age is not None and 0.0 <= age < 60.0

    submits = _get(
        s,
        "hmkd_api_request_duration_seconds_count",
        method="POST",
        route="/v1/jobs",
        status="201",
    )
    assert submits == 3.0
    one = {"method": "GET", "route": "/v1/jobs/{job_id}", "status": "200"}
    assert _get(s, "hmkd_api_request_duration_seconds_count", **one) == 1.0
    assert _get(s, "hmkd_api_request_duration_seconds_bucket", **one, le="+Inf") == 1.0
    artifact = {"method": "GET", "route": "/v1/jobs/{job_id}/artifacts/{name}", "status": "404"}
    assert _get(s, "hmkd_api_request_duration_seconds_count", **artifact) == 1.0
    assert running not in {v for (name, labels) in s for k, v in labels if k == "route"}


def test_unknown_paths_share_one_series_and_apps_keep_their_own_registry(
    app: FastAPI, service_settings: Settings
) -> None:
    from api.app import create_app

    with TestClient(app) as c:
        assert c.get("/no/such/thing-1").status_code == 404
        assert c.get("/no/such/thing-2").status_code == 404
        for i in range(3):  # methods a client makes up: one series, not one each
            assert c.request(f"MADEUP{i}", "/v1/health").status_code == 405
        s = _samples(c.get("/metrics").text)
    labels = {"method": "GET", "route": "<unmatched>", "status": "404"}
    assert _get(s, "hmkd_api_request_duration_seconds_count", **labels) == 2.0
    made_up = {"method": "<other>", "route": "/v1/health", "status": "405"}
    assert _get(s, "hmkd_api_request_duration_seconds_count", **made_up) == 3.0
    with TestClient(create_app(service_settings)) as other:  # a second app: no clash, no share
        s = _samples(other.get("/metrics").text)
    assert _get(s, "hmkd_api_request_duration_seconds_count", **labels) is None


def test_a_database_outage_still_answers(tmp_path: Path) -> None:
    from api.metrics import JobCollector

    families = list(JobCollector(f"sqlite:///{tmp_path / 'missing' / 'x.db'}").collect())
    assert [f.name for f in families] == ["hmkd_metrics_database_up"]
    assert families[0].samples[0].value == 0.0
