"""Hostile input gets a 4xx naming the field, never a 500, and changes nothing.

Each case once answered 500 on PostgreSQL (non-finite floats, NUL bytes, integers past a
32-bit column) or stalled the API (a spec of many thousand unknown keys); the suite runs on
SQLite and on PostgreSQL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from jobs.db import session_scope
from jobs.download_links import _CONTEXT, signing_key
from jobs.models import Job
from jobs.settings import Settings
from tests.api.conftest import job_spec, submit

NUL = "\x00"


def _jobs(settings: Settings) -> int:
    with session_scope(settings.database_url) as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def _fields(response) -> set[str]:
    assert response.status_code == 422, response.text
    return {e["field"] for e in response.json()["detail"]}


@pytest.mark.parametrize(
    ("section", "value", "field"),
    [
        ({"schedule": {"lr": float("inf")}}, None, "schedule.lr"),
        ({"schedule": {"lr": "inf"}}, None, "schedule.lr"),
        ({"schedule": {"lr": "NaN"}}, None, "schedule.lr"),
        ({"schedule": {"iterations": 2**31}}, None, "schedule.iterations"),
        ({"schedule": {"batch_size": 10**6}}, None, "schedule.batch_size"),
        ({"runtime": {"seed": -1}}, None, "runtime.seed"),
        ({"runtime": {"seed": 2**31}}, None, "runtime.seed"),
        ({"eval": {"every": 2**40}}, None, "eval.every"),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_422(
    client: TestClient,
    dataset: dict[str, Path],
    service_settings: Settings,
    section: dict,
    value: None,
    field: str,
) -> None:
    spec = job_spec(dataset, **section)
    body = json.dumps(spec, allow_nan=True)  # Infinity / NaN as Python's json writes them
    r = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert field in _fields(r)
    assert _jobs(service_settings) == 0


def test_control_characters_in_a_spec_name_the_field(
    client: TestClient, dataset: dict[str, Path], service_settings: Settings
) -> None:
    spec = job_spec(dataset)
    spec["data"]["train"]["images"] += NUL
    assert "data.train.images" in _fields(client.post("/v1/jobs", json=spec))
    spec = job_spec(dataset, eval={"metric": "AP" + NUL})
    assert "eval.metric" in _fields(client.post("/v1/jobs", json=spec))
    assert _jobs(service_settings) == 0


def test_control_characters_in_paths_and_queries_are_422_on_every_route(
    client: TestClient, dataset: dict[str, Path]
) -> None:
    job = submit(client, job_spec(dataset))["id"]
    for query in ("name=a%00b", "cursor=%00", "queue=%00", "state=queued%0a"):
        r = client.get(f"/v1/jobs?{query}")
        assert r.status_code == 422, (query, r.text)
        assert r.json()["detail"][0]["loc"][0] == "query"
    for suffix in ("", "/metrics", "/events", "/logs", "/artifacts", "/artifacts/run/x%00"):
        r = client.get(f"/v1/jobs/{job}%00{suffix}")
        assert r.status_code == 422, (suffix, r.text)
    for action in ("cancel", "retry"):
        assert client.post(f"/v1/jobs/{job}%00/{action}").status_code == 422
    r = client.post(f"/v1/jobs/{job}/artifact-links", json={"name": f"run/student{NUL}.pt"})
    assert "name" in _fields(r)
    assert client.get("/v1/downloads/x%00y").status_code == 422
    # the job itself is untouched
    assert client.get(f"/v1/jobs/{job}").json()["state"] == "queued"


def test_query_integers_past_their_bounds_are_422(
    client: TestClient, dataset: dict[str, Path]
) -> None:
    job = submit(client, job_spec(dataset))["id"]
    assert "since" in _fields(client.get(f"/v1/jobs/{job}/metrics?since=2147483648"))
    assert "limit" in _fields(client.get("/v1/jobs?limit=100000"))


def test_thousands_of_errors_answer_a_bounded_list(
    client: TestClient, dataset: dict[str, Path], service_settings: Settings
) -> None:
    spec = job_spec(dataset) | {f"unknown_{i}": i for i in range(20_000)}
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert len(detail) == 51
    assert detail[-1]["type"] == "too_many_errors" and "19950 more" in detail[-1]["msg"]
    assert len(r.content) < 20_000
    assert _jobs(service_settings) == 0


def _signed(key: bytes, body: list) -> str:
    payload = base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")
    mac = hmac.new(key, _CONTEXT + payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


def test_malformed_links_signed_with_the_real_key_are_refused_not_500(
    client: TestClient, service_settings: Settings
) -> None:
    key = signing_key(service_settings)
    for body in (
        ["a" * 32, "run/student.pt", 1, 1, 1e300],  # expiry past any date
        ["a" * 32, "run/stu\u0000dent.pt", 1, 1, 4e9],  # NUL in the name
        ["a" * 32, "run/student.pt", 2**70, 1, 4e9],  # team id past any column
        ["a" * 32, "run/student.pt", 1],  # too few fields
    ):
        r = client.get(f"/v1/downloads/{_signed(key, body)}")
        assert r.status_code == 403, (body, r.status_code, r.text)


def test_openapi_documents_the_answers_every_route_can_give(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            responses = op["responses"]
            assert {"413", "422"} <= set(responses), (method, path)
            if "requestBody" in op:
                assert "400" in responses, (method, path)
            for code, answer in responses.items():
                if code[0] in "45":  # errors are JSON, also where success is text or a stream
                    assert "application/json" in answer["content"], (method, path, code)
    # and a non-UTF-8 body does answer the documented 400
    r = client.post(
        "/v1/jobs", content=b'{"name": "\xff"}', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400


def test_a_spec_is_validated_off_the_event_loop_and_hostile_json_is_4xx(
    client: TestClient, service_settings: Settings
) -> None:
    """Validation runs in the thread pool (the event loop serves other requests meanwhile);
    the route still names the field at fault, and JSON that cannot be decoded is a 4xx."""
    import inspect

    from api.routes import jobs as routes

    assert not inspect.iscoroutinefunction(routes.create_job)  # FastAPI runs it in a thread
    r = client.post("/v1/jobs", json={"name": "x", "data": {}, "student": {}, "bogus": 1})
    assert r.status_code == 422
    fields = {e["field"] for e in r.json()["detail"]}
    assert {"bogus", "data.train"} <= fields, fields
    deep = b"[" * 200_000 + b"]" * 200_000
    for body in (deep[:900_000], b"", b"{nope", b"[1, 2]"):
        r = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
        assert r.status_code in (400, 413, 422), (body[:10], r.status_code)
    assert _jobs(service_settings) == 0
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/JobSpec"}
    assert "Resources" in schema["components"]["schemas"]
