"""Bearer tokens on everything but health, and teams that never see each other's jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from jobs.settings import Settings
from tests.api.conftest import bearer, job_spec, run_to_end, submit


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer hmkd_not-a-real-token"},
        {"Authorization": "Basic YWxpY2U6cGFzcw=="},
        {"Authorization": "Bearer " + "x" * 5000},
    ],
    ids=["none", "unknown", "basic", "huge"],
)
def test_401_without_a_valid_token(
    client: TestClient, dataset: dict[str, Path], headers: dict[str, str]
) -> None:
    anonymous = TestClient(client.app, headers=headers)
    for method, url in [
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/queue"),
        ("GET", "/v1/me"),
    ]:
        r = anonymous.request(method, url, json=job_spec(dataset) if method == "POST" else None)
        assert r.status_code == 401, (url, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert "token" in r.json()["detail"]


def test_health_needs_no_token(client: TestClient) -> None:
    anonymous = TestClient(client.app)
    assert anonymous.get("/v1/health").status_code == 200
    assert anonymous.get("/v1/ready").status_code == 200


def test_revoked_token_is_refused(
    client: TestClient, admin: tuple[Any, str], service_settings: Settings
) -> None:
    from sqlalchemy import update

    from jobs.auth import hash_token
    from jobs.db import session_scope
    from jobs.models import ApiToken

    assert client.get("/v1/jobs").status_code == 200
    with session_scope(service_settings.database_url) as session:
        session.execute(
            update(ApiToken).where(ApiToken.token_hash == hash_token(admin[1])).values(revoked=True)
        )
    assert client.get("/v1/jobs").status_code == 401


def test_another_teams_job_is_404_everywhere(
    client: TestClient,
    dataset: dict[str, Path],
    service_settings: Settings,
    other_team_user: tuple[Any, str],
) -> None:
    job = submit(client, job_spec(dataset, name="alpha-secret"))
    done = submit(client, job_spec(dataset, name="alpha-done"))
    run_to_end(service_settings, done["id"], files={"run/student.pt": b"w"}, state="failed")
    bob = bearer(other_team_user[1])
    for job_id in (job["id"], done["id"]):
        for method, path in [
            ("GET", ""),
            ("GET", "/metrics"),
            ("GET", "/events"),
            ("GET", "/logs"),
            ("POST", "/cancel"),
            ("POST", "/retry"),
            ("GET", "/artifacts"),
            ("GET", "/artifacts/run/student.pt"),
        ]:
            r = client.request(method, f"/v1/jobs/{job_id}{path}", headers=bob)
            assert r.status_code == 404, (method, path, r.status_code)
            assert "alpha" not in r.text  # nothing of the job leaks, not even its name

    for job_id in (job["id"], done["id"]):
        r = client.post(
            f"/v1/jobs/{job_id}/artifact-links", json={"name": "run/student.pt"}, headers=bob
        )
        assert r.status_code == 404 and "alpha" not in r.text

    listing = client.get("/v1/jobs", headers=bob).json()
    assert listing["items"] == []
    queue = client.get("/v1/queue", headers=bob).json()
    assert queue["queues"][0]["queued"] == 1  # the shared queue's load is visible...
    assert queue["queues"][0]["jobs"] == []  # ...but not whose jobs they are
    # and alice's view is untouched by bob's attempts
    assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == "queued"
    assert client.get(f"/v1/jobs/{done['id']}").json()["state"] == "failed"
