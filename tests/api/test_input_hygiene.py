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


def test_an_integer_longer_than_python_converts_names_its_field(
    client: TestClient, dataset: dict[str, Path], service_settings: Settings
) -> None:
    """json.loads refuses an integer of more than 4300 digits with a bare ValueError."""
    body = json.dumps(job_spec(dataset, schedule={"iterations": 0}))
    body = body.replace('"iterations": 0', '"iterations": ' + "9" * 5000)
    r = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert "schedule.iterations" in _fields(r)
    assert _jobs(service_settings) == 0


def _with(spec: dict, path: str, value: object) -> dict:
    """`spec` with `value` at the dotted `path`."""
    *parents, last = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return spec


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("data.train.images", "{train_images}\ud800", "data.train.images"),
        ("student.weights", "/weights\ud800.pt", "student.weights"),
        ("student.weights", "weights\udcff.pt", "student.weights"),
        # the range's name becomes a metric's: refused by the rule for those names
        ("eval.extra_area_ranges", {"\ud800": [0, 64]}, "eval.extra_area_ranges"),
        ("distill.hmkd.hm.level_weights", {"\udcff": 1.0}, "distill.hmkd.hm.level_weights"),
    ],
)
def test_lone_surrogates_in_a_spec_name_the_field(
    client: TestClient,
    dataset: dict[str, Path],
    service_settings: Settings,
    path: str,
    value: object,
    field: str,
) -> None:
    """A JSON `\\ud800` escape decodes to text no file name, database or answer can encode:
    it once answered 500 (or was stored, for a key) instead of naming the field."""
    if isinstance(value, str):
        value = value.format(train_images=dataset["train_images"])
    spec = _with(job_spec(dataset), path, value)
    body = json.dumps(spec)  # ASCII: the surrogate travels as its escape
    r = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert any(f.startswith(field) for f in _fields(r)), r.text
    assert _jobs(service_settings) == 0


def test_a_forged_cursor_with_a_control_character_is_422(
    client: TestClient, dataset: dict[str, Path]
) -> None:
    """A cursor is base64 JSON; the job id inside it reached the query unchecked (PostgreSQL
    refuses a NUL, and no database takes a lone surrogate)."""
    submit(client, job_spec(dataset))
    for job_id in ("\u0000", "\ud800"):
        raw = json.dumps(["2020-01-01T00:00:00+00:00", job_id]).encode()
        cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        assert "cursor" in _fields(client.get("/v1/jobs", params={"cursor": cursor}))


def test_query_values_are_read_as_utf8_when_looking_for_control_characters(
    client: TestClient, dataset: dict[str, Path]
) -> None:
    """UTF-8 continuation bytes 0x80-0x9f (in `ā`, `数`, ...) are not C1 control characters."""
    job = submit(client, job_spec(dataset, name="数据 ā"))
    for name in ("数据", "ā"):
        r = client.get("/v1/jobs", params={"name": name})
        assert r.status_code == 200, r.text
        assert [j["id"] for j in r.json()["items"]] == [job["id"]]
    assert "name" in _fields(client.get("/v1/jobs", params={"name": "a\u0085"}))


def test_a_path_that_cannot_be_resolved_is_422_naming_the_field(
    client: TestClient, dataset: dict[str, Path], service_settings: Settings
) -> None:
    """A symlink loop, or a name longer than the file system takes, under the dataset roots."""
    root = service_settings.dataset_roots[0]
    (root / "loop").symlink_to(root / "loop")
    too_long = dataset["train_images"] / ("a" * 300)
    for path, value in [
        ("data.train.images", root / "loop"),
        ("data.val.annotations", root / "loop" / "annotations.json"),
        ("student.weights", root / "loop"),
        ("data.train.images", too_long),
    ]:
        spec = _with(job_spec(dataset), path, str(value))
        r = client.post("/v1/jobs", json=spec)
        assert path in _fields(r), (path, value)
    folder = {"images": str(root / "loop"), "annotations": str(dataset["train_annotations"])}
    r = client.post("/v1/datasets", json={"name": "looped", "train": folder})
    assert "train.images" in _fields(r)
    assert _jobs(service_settings) == 0
    assert client.get("/v1/datasets").json() == []


def test_json_that_does_not_parse_is_blamed_on_the_body_on_every_json_route(
    client: TestClient, dataset: dict[str, Path], service_settings: Settings
) -> None:
    """The parser's character offset was reported as the field (`"field": "11"`)."""
    job = submit(client, job_spec(dataset))
    routes = [
        ("post", "/v1/jobs"),
        ("put", "/v1/admin/teams/alpha"),
        ("post", "/v1/datasets/uploads"),
        ("post", "/v1/datasets"),
        ("post", f"/v1/jobs/{job['id']}/artifact-links"),
    ]
    for method, url in routes:
        for body, at in (('{"share": 2', 11), ("[1,2", 4)):
            r = getattr(client, method)(
                url, content=body, headers={"content-type": "application/json"}
            )
            assert r.status_code == 422, (url, r.text)
            (error,) = r.json()["detail"]
            assert error["field"] == "<body>" and error["type"] == "json_invalid", (url, error)
            assert error["msg"].endswith(f"at character {at}"), (url, error)
    assert _jobs(service_settings) == 1
