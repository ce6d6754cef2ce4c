"""Artifact listing and download: sha256 ETag, 304, byte ranges, and names that try to escape."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from jobs.artifacts import store_of
from jobs.db import session_scope
from jobs.models import Artifact
from jobs.settings import Settings
from tests.api.conftest import bearer, job_spec, run_to_end, submit

PAYLOAD = bytes(range(256)) * 40  # 10240 bytes


@pytest.fixture
def finished(client: TestClient, dataset: dict[str, Path], service_settings: Settings) -> str:
    job = submit(client, job_spec(dataset))
    files = {"run/student.pt": PAYLOAD, "run/eval.json": b'{"AP": 0.3}'}
    run_to_end(service_settings, job["id"], files=files)
    return job["id"]


def test_list_artifacts(client: TestClient, finished: str) -> None:
    listed = client.get(f"/v1/jobs/{finished}/artifacts").json()
    assert [a["name"] for a in listed] == ["run/eval.json", "run/student.pt"]
    student = listed[1]
    assert student["size"] == len(PAYLOAD)
    assert student["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()


def test_download_etag_and_304(client: TestClient, finished: str) -> None:
    _assert_whole_and_etag(client, f"/v1/jobs/{finished}/artifacts/run/student.pt")


def _assert_whole_and_etag(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert r.status_code == 200 and r.content == PAYLOAD
    etag = r.headers["etag"]
    assert etag == f'"{hashlib.sha256(PAYLOAD).hexdigest()}"'
    assert r.headers["accept-ranges"] == "bytes"
    assert 'filename="student.pt"' in r.headers["content-disposition"]

    r = client.get(url, headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200


def test_download_ranges(client: TestClient, finished: str) -> None:
    _assert_ranges(client, f"/v1/jobs/{finished}/artifacts/run/student.pt")


def _assert_ranges(client: TestClient, url: str) -> None:
    size = len(PAYLOAD)
    r = client.get(url, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == PAYLOAD[100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{size}"
    r = client.get(url, headers={"Range": "bytes=10000-"})
    assert r.status_code == 206 and r.content == PAYLOAD[10000:]
    r = client.get(url, headers={"Range": "bytes=-40"})
    assert r.status_code == 206 and r.content == PAYLOAD[-40:]

    r = client.get(url, headers={"Range": f"bytes={size}-{size + 10}"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}"
    assert client.get(url, headers={"Range": "bytes=500-100"}).status_code in (400, 416)
    assert client.get(url, headers={"Range": "lines=1-2"}).status_code in (400, 416)
    huge = "9" * 5000  # int() refuses more than 4300 digits: a 400 or 416, never a 500
    assert client.get(url, headers={"Range": f"bytes=0-{huge}"}).status_code in (200, 206, 400, 416)
    assert client.get(url, headers={"Range": f"bytes={huge}-"}).status_code in (400, 416)

    # If-Range with a stale ETag: the whole (current) file, never a mismatched piece
    r = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert r.status_code == 200 and r.content == PAYLOAD


def test_unknown_artifact_is_404(client: TestClient, finished: str) -> None:
    assert client.get(f"/v1/jobs/{finished}/artifacts/run/nothing.pt").status_code == 404
    assert client.get(f"/v1/jobs/{'a' * 32}/artifacts/run/student.pt").status_code == 404


@pytest.mark.parametrize(
    "name",
    [
        "..%2F..%2Fetc%2Fpasswd",
        "run/%2E%2E/%2E%2E/secret.txt",
        "run%2F..%2F..%2Fsecret.txt",
        "%2Fetc%2Fpasswd",
        "run/student.pt%00",
    ],
)
def test_traversal_names_never_reach_a_file(
    client: TestClient, finished: str, service_settings: Settings, name: str
) -> None:
    secret = Path(service_settings.artifacts_dir or "") / "secret.txt"
    secret.write_text("top secret")
    r = client.get(f"/v1/jobs/{finished}/artifacts/{name}")
    assert r.status_code in (400, 404, 422), r.text
    assert b"top secret" not in r.content and b"root:" not in r.content


def test_dot_segments_are_refused_even_when_registered(
    client: TestClient, finished: str, service_settings: Settings
) -> None:
    """`run/../../x` normalised away by the client or not, and even with a database row
    naming it, the store never opens a file outside the job's folder."""
    artifacts = Path(service_settings.artifacts_dir or "")
    (artifacts / "x").write_text("top secret")
    link = artifacts / finished / "run" / "link.pt"
    link.symlink_to(artifacts / "x")
    with session_scope(service_settings.database_url) as session:
        for name in ("run/../../x", "run/link.pt"):
            session.add(Artifact(job_id=finished, name=name, kind="other", size=10, sha256="0"))
    for url in (
        f"/v1/jobs/{finished}/artifacts/run/../../x",
        f"/v1/jobs/{finished}/artifacts/run/%2E%2E/%2E%2E/x",
        f"/v1/jobs/{finished}/artifacts/run/link.pt",
    ):
        r = client.get(url)
        assert r.status_code in (400, 404), (url, r.status_code)
        assert b"top secret" not in r.content


# ---- the same answers when the artifacts live in object storage -------------------------------


@pytest.fixture
def s3_client(s3_settings: Settings, admin: tuple[Any, str]) -> Iterator[TestClient]:
    """alice calling an API whose artifacts are in the test bucket, not on its disk."""
    from api.app import create_app

    with TestClient(create_app(s3_settings), headers=bearer(admin[1])) as c:
        yield c


@pytest.fixture
def finished_in_s3(
    s3_client: TestClient, dataset: dict[str, Path], s3_settings: Settings, tmp_path: Path
) -> str:
    """A job a worker on another machine (its own artifacts folder) ran and published."""
    worker = s3_settings.model_copy(update={"artifacts_dir": tmp_path / "worker-disk"})
    job = submit(s3_client, job_spec(dataset))
    files = {
        "run/student.pt": PAYLOAD,
        "run/eval.json": b'{"AP": 0.3}',
        "logs.txt": b"".join(b"line %d\n" % i for i in range(5000)),
    }
    run_to_end(worker, job["id"], files=files)
    store = store_of(worker)
    for name in files:
        store.publish(job["id"], name)
    assert not (Path(s3_settings.artifacts_dir or "") / job["id"]).exists()
    return job["id"]


def test_downloads_stream_from_object_storage_with_etag_and_ranges(
    s3_client: TestClient, finished_in_s3: str
) -> None:
    url = f"/v1/jobs/{finished_in_s3}/artifacts/run/student.pt"
    _assert_whole_and_etag(s3_client, url)
    _assert_ranges(s3_client, url)
    assert s3_client.get(f"/v1/jobs/{finished_in_s3}/artifacts/run/none.pt").status_code == 404
    r = s3_client.get(f"/v1/jobs/{finished_in_s3}/artifacts/run/%2E%2E/%2E%2E/x")
    assert r.status_code in (400, 404)


def test_logs_are_read_from_object_storage(s3_client: TestClient, finished_in_s3: str) -> None:
    r = s3_client.get(f"/v1/jobs/{finished_in_s3}/logs", params={"tail": 2})
    assert r.status_code == 200 and r.text == "line 4998\nline 4999\n"
    size = int(r.headers["x-log-offset"])
    r = s3_client.get(f"/v1/jobs/{finished_in_s3}/logs", params={"offset": size - 10})
    assert r.text == "line 4999\n"[-10:] and int(r.headers["x-log-offset"]) == size


def test_deleting_an_artifact_or_the_job_deletes_the_objects(
    s3_client: TestClient, finished_in_s3: str, s3_settings: Settings
) -> None:
    storage = store_of(s3_settings).storage
    r = s3_client.delete(f"/v1/jobs/{finished_in_s3}/artifacts/run/eval.json")
    assert r.status_code == 200, r.text
    assert storage.size(finished_in_s3, "run/eval.json") is None
    assert storage.size(finished_in_s3, "run/student.pt") == len(PAYLOAD)
    assert s3_client.delete(f"/v1/jobs/{finished_in_s3}").status_code == 200
    assert storage.size(finished_in_s3, "run/student.pt") is None
    assert storage.size(finished_in_s3, "logs.txt") is None


def test_an_unreachable_bucket_is_a_503_not_a_500(
    finished_in_s3: str, s3_settings: Settings, admin: tuple[Any, str]
) -> None:
    from api.app import create_app

    down = s3_settings.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:1"})
    with TestClient(create_app(down), headers=bearer(admin[1])) as c:
        r = c.get(f"/v1/jobs/{finished_in_s3}/artifacts/run/student.pt")
        assert r.status_code == 503 and r.headers["retry-after"] == "10", r.text
        assert c.get(f"/v1/jobs/{finished_in_s3}/logs").status_code == 503
