"""The storage seam: the shared folder and an S3 bucket (moto's server) keep one contract, and
the artifact store publishes, fetches, resumes and prunes through either."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from jobs.artifacts import ArtifactNameError, ArtifactStore
from jobs.storage import S3Bucket, Storage, StorageError, storage_from

PAYLOAD = bytes(range(256)) * 9000  # 2.3 MB: more than one read chunk


@pytest.fixture(params=["shared", "s3"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], ArtifactStore]:
    """make_store(machine) -> the artifact store as that machine sees it: with a shared folder
    every machine has the same root; with S3 each has its own scratch folder."""
    if request.param == "shared":
        return lambda machine: ArtifactStore(tmp_path / "shared")
    endpoint = request.getfixturevalue("s3_endpoint")
    url = request.getfixturevalue("s3_url")
    return lambda machine: ArtifactStore(
        tmp_path / machine, storage_from(tmp_path / machine, url, endpoint, "us-east-1")
    )


def _write(store: ArtifactStore, job_id: str, name: str, data: bytes) -> Path:
    path = store.resolve(job_id, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_a_published_file_is_readable_whole_and_in_ranges_from_another_machine(
    make_store: Callable[[str], ArtifactStore],
) -> None:
    worker, api = make_store("worker"), make_store("api")
    _write(worker, "job1", "run/student.pt", PAYLOAD)
    worker.publish("job1", "run/student.pt")
    storage: Storage = api.storage
    assert storage.size("job1", "run/student.pt") == len(PAYLOAD)
    assert b"".join(storage.read("job1", "run/student.pt")) == PAYLOAD
    assert b"".join(storage.read("job1", "run/student.pt", 10, 19)) == PAYLOAD[10:20]
    tail = b"".join(storage.read("job1", "run/student.pt", len(PAYLOAD) - 5))
    assert tail == PAYLOAD[-5:]
    assert storage.size("job1", "run/missing.pt") is None


def test_fetch_brings_the_file_to_this_machine_and_reports_absence(
    make_store: Callable[[str], ArtifactStore],
) -> None:
    worker, other = make_store("worker"), make_store("other")
    _write(worker, "job1", "run/checkpoints/attempt-1/ckpt_00000005.pt", PAYLOAD)
    worker.publish("job1", "run/checkpoints/attempt-1/ckpt_00000005.pt")
    assert other.fetch("job1", "run/checkpoints/attempt-1/ckpt_00000005.pt")
    local = other.resolve("job1", "run/checkpoints/attempt-1/ckpt_00000005.pt")
    assert hashlib.sha256(local.read_bytes()).digest() == hashlib.sha256(PAYLOAD).digest()
    assert not other.fetch("job1", "run/checkpoints/attempt-1/ckpt_00000010.pt")
    assert not list(local.parent.glob(".*"))  # no half-downloaded file left behind


def test_delete_one_artifact_and_a_whole_job_from_the_bucket(
    s3_endpoint: str, s3_url: str, tmp_path: Path
) -> None:
    """(The shared folder's files are the local ones, which `jobs.retention` deletes.)"""
    worker, api = (
        ArtifactStore(tmp_path / m, storage_from(tmp_path / m, s3_url, s3_endpoint, "us-east-1"))
        for m in ("worker", "api")
    )
    for name in ("run/a.pt", "run/b.pt", "logs.txt"):
        _write(worker, "job1", name, b"x" * 10)
        worker.publish("job1", name)
    _write(worker, "job2", "run/a.pt", b"y")
    worker.publish("job2", "run/a.pt")
    api.discard("job1", "run/a.pt")
    assert api.storage.size("job1", "run/a.pt") is None
    assert api.storage.size("job1", "run/b.pt") == 10
    api.discard("job1")
    assert api.storage.size("job1", "logs.txt") is None
    assert api.storage.size("job2", "run/a.pt") == 1  # another job's prefix is untouched


def test_names_that_leave_the_job_are_refused_before_any_request(
    make_store: Callable[[str], ArtifactStore],
) -> None:
    store = make_store("api")
    for bad in ("../job2/run/a.pt", "/etc/passwd", "run/\x00.pt", "run\\..\\x"):
        with pytest.raises(ArtifactNameError):
            store.storage.size("job1", bad)
    with pytest.raises(ArtifactNameError):
        store.storage.size("../x", "run/a.pt")


def test_pruning_earlier_attempts_drops_their_stored_checkpoints(
    make_store: Callable[[str], ArtifactStore],
) -> None:
    first, second = make_store("first"), make_store("second")
    old = "run/checkpoints/attempt-1/ckpt_00000005.pt"
    best = "run/checkpoints/attempt-1/best.pt"
    for name in (old, best):
        _write(first, "job1", name, b"old")
        first.publish("job1", name)
    new = "run/checkpoints/attempt-2/ckpt_00000010.pt"
    _write(second, "job1", new, b"new")
    second.publish("job1", new)
    second.prune_earlier_attempts("job1", 2, registered=[old, best, new])
    assert second.storage.size("job1", old) is None
    assert second.storage.size("job1", best) == 3  # best.pt is kept
    assert second.storage.size("job1", new) == 3


def test_s3_errors_name_the_bucket_and_key(s3_endpoint: str, tmp_path: Path) -> None:
    bucket = S3Bucket("s3://no-such-bucket-here/p", endpoint_url=s3_endpoint, region="us-east-1")
    path = tmp_path / "f"
    path.write_bytes(b"1")
    with pytest.raises(StorageError, match="s3://no-such-bucket-here/p/job1/run/f"):
        bucket.publish("job1", "run/f", path)


@pytest.mark.parametrize("url", ["s3://", "http://bucket/x", "bucket/x", "s3:///x"])
def test_a_malformed_storage_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="s3://bucket"):
        S3Bucket(url)
    from jobs.settings import Settings

    with pytest.raises(ValueError, match="HMKD_STORAGE_URL"):
        Settings(storage_url=url)


def test_a_teacher_from_another_jobs_storage_is_fetched_before_training(
    s3_endpoint: str, s3_url: str, tmp_path: Path
) -> None:
    """`teacher.weights: job:<id>` resolves to that job's student.pt under the artifacts root;
    a worker on another machine downloads it first. Paths outside the root are left alone."""
    from worker.tasks import fetch_weights

    def store(machine: str) -> ArtifactStore:
        root = tmp_path / machine
        return ArtifactStore(root, storage_from(root, s3_url, s3_endpoint, "us-east-1"))

    trained, here = store("trainer"), store("here")
    _write(trained, "teacherjob", "run/student.pt", PAYLOAD)
    trained.publish("teacherjob", "run/student.pt")
    spec = {
        "teacher": {"weights": str(here.root / "teacherjob" / "run" / "student.pt")},
        "student": {"weights": str(tmp_path / "elsewhere.pt")},
    }
    assert fetch_weights(here, spec) == ["teacher.weights fetched from job teacherjob's storage"]
    assert here.resolve("teacherjob", "run/student.pt").read_bytes() == PAYLOAD
    assert fetch_weights(here, spec) == []  # already here
