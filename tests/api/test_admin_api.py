"""Revoking tokens and disabling users over the API: an administrator's business, effective on
the very next request, and a disabled user's jobs stay with their team."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from jobs.admin import create_user
from jobs.settings import Settings
from tests.api.conftest import bearer, job_spec


def test_admin_revokes_a_token_and_disables_a_user(
    client: TestClient,
    other_team_user: tuple[Any, str],
    service_settings: Settings,
    dataset: dict[str, Path],
) -> None:
    _, bob = other_team_user
    assert client.get("/v1/me", headers=bearer(bob)).status_code == 200
    # a non-admin may do neither
    r = client.post(f"/v1/admin/tokens/{bob[:8]}/revoke", headers=bearer(bob))
    assert r.status_code == 403
    r = client.post("/v1/admin/tokens/hmkd_zzz/revoke")
    assert r.status_code == 404 and "no live token" in r.json()["detail"]

    r = client.post(f"/v1/admin/tokens/{bob[:8]}/revoke")
    assert r.status_code == 200 and r.json() == {"revoked": [bob[:8]]}
    assert client.get("/v1/me", headers=bearer(bob)).status_code == 401

    carol = create_user(service_settings, "carol", team="alpha").token  # the admin's team
    job = client.post("/v1/jobs", json=job_spec(dataset), headers=bearer(carol)).json()["id"]
    r = client.post("/v1/admin/users/carol/disable")
    assert r.status_code == 200 and r.json()["revoked"] == [carol[:8]]
    assert client.get("/v1/jobs", headers=bearer(carol)).status_code == 401
    assert client.get(f"/v1/jobs/{job}").json()["id"] == job  # still the team's
    assert client.post("/v1/admin/users/nobody/disable").status_code == 404


def test_admin_sets_a_teams_share_and_gpu_quota(
    client: TestClient, other_team_user: tuple[Any, str]
) -> None:
    r = client.put("/v1/admin/teams/beta", json={"share": 3, "gpu_quota": 16})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "name": "beta", "share": 3.0, "gpu_quota": 16, "max_running": None, "gpus_running": 0,
    }  # fmt: skip
    r = client.put("/v1/admin/teams/beta", json={"gpu_quota": None})  # cleared; share stays
    assert r.json()["gpu_quota"] is None and r.json()["share"] == 3.0
    assert {t["name"] for t in client.get("/v1/admin/teams").json()} == {"alpha", "beta"}
    bads = ({"share": 0}, {"share": None}, {"gpu_quota": -1}, {"colour": "red"})
    for bad in (*bads, {"share": True}, {"max_running": False}):  # not read as 1 and 0
        r = client.put("/v1/admin/teams/beta", json=bad)
        assert r.status_code == 422, bad
        assert [e["field"] for e in r.json()["detail"]] == list(bad), r.text  # as every 422
    assert client.get("/v1/admin/teams").json()[1]["share"] == 3.0  # none of them changed it
    assert client.put("/v1/admin/teams/nobody", json={"share": 2}).status_code == 404
    theirs = bearer(other_team_user[1])  # not an administrator
    assert client.put("/v1/admin/teams/beta", json={"share": 9}, headers=theirs).status_code == 403
    assert client.get("/v1/admin/teams", headers=theirs).status_code == 403
