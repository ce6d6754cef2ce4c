"""Signed download links: a token-free download that is bound to one job, one artifact and one
team, expires, and refuses any link that was altered or signed with another key."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from jobs.download_links import (
    DownloadGrant,
    ExpiredLink,
    InvalidLink,
    sign_link,
    signing_key,
    verify_link,
)
from jobs.settings import Settings
from tests.api.conftest import job_spec, run_to_end, submit

PAYLOAD = bytes(range(256)) * 64  # 16 KiB


@pytest.fixture
def finished(client: TestClient, dataset: dict[str, Path], service_settings: Settings) -> str:
    job = submit(client, job_spec(dataset))
    run_to_end(service_settings, job["id"], files={"run/student.pt": PAYLOAD})
    return job["id"]


def _link(client: TestClient, job_id: str, name: str = "run/student.pt") -> dict[str, Any]:
    r = client.post(f"/v1/jobs/{job_id}/artifact-links", json={"name": name})
    assert r.status_code == 201, r.text
    return r.json()


def _grant(job_id: str, admin: tuple[Any, str], **changes: Any) -> DownloadGrant:
    user = admin[0]
    fields: dict[str, Any] = {
        "job_id": job_id,
        "name": "run/student.pt",
        "team_id": user.team_id,
        "user_id": user.id,
        "expires_at": datetime.now(UTC) + timedelta(minutes=5),
    }
    return DownloadGrant(**(fields | changes))


def test_link_downloads_without_a_token(
    client: TestClient, finished: str, admin: tuple[Any, str], service_settings: Settings
) -> None:
    link = _link(client, finished)
    assert link["url"].startswith("/v1/downloads/") and admin[1] not in link["url"]
    expires = datetime.fromisoformat(link["expires_at"])
    ttl = (expires - datetime.now(UTC)).total_seconds()
    assert 0 < ttl <= service_settings.download_link_seconds
    anonymous = TestClient(client.app)
    r = anonymous.get(link["url"])
    assert r.status_code == 200, r.text
    assert hashlib.sha256(r.content).hexdigest() == hashlib.sha256(PAYLOAD).hexdigest()
    assert r.headers["etag"] == f'"{hashlib.sha256(PAYLOAD).hexdigest()}"'
    assert 'filename="student.pt"' in r.headers["content-disposition"]
    assert r.headers["cache-control"] == "private, no-store"
    part = anonymous.get(link["url"], headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == PAYLOAD[100:200]
    again = anonymous.get(link["url"], headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304


def test_link_for_a_missing_artifact_is_404(client: TestClient, finished: str) -> None:
    r = client.post(f"/v1/jobs/{finished}/artifact-links", json={"name": "run/nope.pt"})
    assert r.status_code == 404 and "nope.pt" in r.json()["detail"]
    r = client.post(f"/v1/jobs/{finished}/artifact-links", json={"name": "../../etc/passwd"})
    assert r.status_code == 404


def test_expired_link_is_410(
    client: TestClient, finished: str, admin: tuple[Any, str], service_settings: Settings
) -> None:
    past = datetime.now(UTC) - timedelta(seconds=1)
    link = sign_link(signing_key(service_settings), _grant(finished, admin, expires_at=past))
    r = TestClient(client.app).get(f"/v1/downloads/{link}")
    assert r.status_code == 410 and "expired" in r.json()["detail"]


def test_tampered_links_are_403(
    client: TestClient, finished: str, admin: tuple[Any, str], service_settings: Settings
) -> None:
    anonymous = TestClient(client.app)
    good = _link(client, finished)["url"].removeprefix("/v1/downloads/")
    payload, signature = good.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body[1] = "run/checkpoints/best.pt"  # another artifact of the same job
    body[4] += 3600  # and an hour more
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")
    other_key = sign_link(b"k" * 32, _grant(finished, admin)).split(".")[1]
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    for link in (
        f"{forged}.{signature}",
        f"{payload}.{flipped}",
        f"{payload}.{other_key}",
        payload,
        f"{payload}.",
        f".{signature}",
        "garbage",
    ):
        r = anonymous.get(f"/v1/downloads/{link}")
        assert r.status_code == 403, (link, r.status_code, r.text)
    assert anonymous.get(f"/v1/downloads/{good}").status_code == 200


def test_link_is_bound_to_the_team(
    client: TestClient,
    finished: str,
    admin: tuple[Any, str],
    other_team_user: tuple[Any, str],
    service_settings: Settings,
) -> None:
    """A genuine signature over another team's grant still reaches nothing of this job."""
    key = signing_key(service_settings)
    bob = other_team_user[0]
    forged = sign_link(key, _grant(finished, admin, team_id=bob.team_id, user_id=bob.id))
    r = TestClient(client.app).get(f"/v1/downloads/{forged}")
    assert r.status_code == 404 and "alpha" not in r.text
    unknown = sign_link(key, _grant("0" * 32, admin))
    assert TestClient(client.app).get(f"/v1/downloads/{unknown}").status_code == 404


def test_signing_key_file_and_configured_secret(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    key = signing_key(settings)
    path = tmp_path / "data" / "download.key"
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert signing_key(settings) == key  # kept: links survive an API restart
    assert [p.name for p in path.parent.iterdir()] == ["download.key"]  # no temp file left

    configured = Settings(data_dir=tmp_path / "data", download_secret="s" * 40)
    assert signing_key(configured) == b"s" * 40
    with pytest.raises(ValueError, match="at least 32"):
        signing_key(Settings(data_dir=tmp_path, download_secret="short"))


def test_verify_link_directly() -> None:
    key = b"x" * 32
    now = datetime(2030, 1, 1, tzinfo=UTC)
    grant = DownloadGrant("a" * 32, "run/student.pt", 1, 2, now + timedelta(seconds=10))
    link = sign_link(key, grant)
    assert verify_link(key, link, now=now) == grant
    with pytest.raises(ExpiredLink):
        verify_link(key, link, now=now + timedelta(seconds=10))
    with pytest.raises(InvalidLink):
        verify_link(b"y" * 32, link, now=now)
