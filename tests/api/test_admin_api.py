"""Revoking tokens and disabling users over the API: an administrator's business, effective on
the very next request, and a disabled user's jobs stay with their team."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from jobs import auth
from jobs.admin import create_user
from jobs.auth import LEGACY_PREFIX_CHARS, SHOWN_PREFIX_CHARS
from jobs.db import session_scope
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
    shown = bob[:SHOWN_PREFIX_CHARS]  # as `hmkd tokens list` shows it
    r = client.post(f"/v1/admin/tokens/{shown}/revoke", headers=bearer(bob))
    assert r.status_code == 403
    r = client.post("/v1/admin/tokens/hmkd_zzz/revoke")
    assert r.status_code == 404 and "no live token" in r.json()["detail"]
    r = client.post(f"/v1/admin/tokens/{bob[:8]}/revoke")  # shorter than shown: not a prefix
    assert r.status_code == 404 and "no live token" in r.json()["detail"]

    r = client.post(f"/v1/admin/tokens/{shown}/revoke")
    assert r.status_code == 200 and r.json() == {"revoked": [shown]}
    assert client.get("/v1/me", headers=bearer(bob)).status_code == 401

    carol = create_user(service_settings, "carol", team="alpha").token  # the admin's team
    job = client.post("/v1/jobs", json=job_spec(dataset), headers=bearer(carol)).json()["id"]
    r = client.post("/v1/admin/users/carol/disable")
    assert r.status_code == 200 and r.json()["revoked"] == [carol[:SHOWN_PREFIX_CHARS]]
    assert client.get("/v1/jobs", headers=bearer(carol)).status_code == 401
    assert client.get(f"/v1/jobs/{job}").json()["id"] == job  # still the team's
    assert client.post("/v1/admin/users/nobody/disable").status_code == 404


def _old_token(settings: Settings, user: str, token: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """`token` for `user`, made by `create_token` as before 0007: its prefix 8 characters."""
    with monkeypatch.context() as m, session_scope(settings.database_url) as s:
        m.setattr(auth, "generate_token", lambda: token)
        m.setattr(auth, "SHOWN_PREFIX_CHARS", LEGACY_PREFIX_CHARS)
        made, row = auth.create_token(s, auth.get_user(s, user))
        assert made == token and row.prefix == token[:8]
    return token


def test_admin_revokes_one_of_two_old_tokens_sharing_a_prefix(
    client: TestClient,
    other_team_user: tuple[Any, str],
    service_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two of 759 old tokens shared `hmkd_P_h`: the shared prefix and 20 characters of one
    were refused, so that one could not be revoked alone; `hmkd_DHPWRONGWRONG` was cut to 8
    characters and revoked `hmkd_DHP...`."""
    first = _old_token(service_settings, "bob", "hmkd_P_h" + "a1" * 20, monkeypatch)
    second = _old_token(service_settings, "bob", "hmkd_P_h" + "b2" * 20, monkeypatch)
    other = _old_token(service_settings, "bob", "hmkd_DHP" + "c3" * 20, monkeypatch)

    r = client.post("/v1/admin/tokens/hmkd_P_h/revoke")
    assert r.status_code == 404, r.text
    assert "more than one live token" in r.json()["detail"]
    assert "give the whole token" in r.json()["detail"]
    r = client.post(f"/v1/admin/tokens/{first[:20]}/revoke")
    assert r.status_code == 404 and "no live token" in r.json()["detail"]
    assert first[:20] not in r.json()["detail"]  # an error never repeats more than a prefix
    r = client.post("/v1/admin/tokens/hmkd_DHPWRONGWRONG/revoke")
    assert r.status_code == 404 and "no live token" in r.json()["detail"]
    for token in (first, second, other):
        assert client.get("/v1/me", headers=bearer(token)).status_code == 200

    r = client.post(f"/v1/admin/tokens/{first}/revoke")  # the whole token: that one only
    assert r.status_code == 200 and r.json() == {"revoked": ["hmkd_P_h"]}
    assert client.get("/v1/me", headers=bearer(first)).status_code == 401
    assert client.get("/v1/me", headers=bearer(second)).status_code == 200
    r = client.post(f"/v1/admin/tokens/{first}/revoke")
    assert r.status_code == 404 and "revoked" in r.json()["detail"]

    r = client.post("/v1/admin/tokens/hmkd_DHP/revoke")  # an old 8-character prefix, exactly
    assert r.status_code == 200 and r.json() == {"revoked": ["hmkd_DHP"]}
    assert client.get("/v1/me", headers=bearer(other)).status_code == 401
    assert client.get("/v1/me", headers=bearer(second)).status_code == 200


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
