"""Artifact names from URLs never reach outside their job's folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from jobs.artifacts import ArtifactNameError, ArtifactStore, artifact_kind, file_sha256

JOB = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    store = ArtifactStore(tmp_path / "artifacts")
    run = store.run_dir(JOB)
    (run / "checkpoints").mkdir(parents=True)
    for name in ("student.pt", "eval.json", "metrics.jsonl", "spec.yaml", "result.json"):
        (run / name).write_bytes(name.encode())
    for name in ("ckpt_00000004.pt", "best.pt", ".ckpt_00000008.pt.abc.tmp"):
        (run / "checkpoints" / name).write_bytes(b"x")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"tb")
    store.log_path(JOB).write_text("log\n")
    return store


def test_layout(store: ArtifactStore) -> None:
    root = store.root
    assert store.job_dir(JOB) == root / JOB
    assert store.run_dir(JOB) == root / JOB / "run"
    assert store.log_path(JOB) == root / JOB / "logs.txt"
    assert store.resolve(JOB, "run/student.pt") == root / JOB / "run" / "student.pt"
    assert store.resolve(JOB, "run/./eval.json") == root / JOB / "run" / "eval.json"


@pytest.mark.parametrize(
    "name",
    ["../x", "/etc/passwd", "run/../../x", "run/../logs.txt", "", "run/\x00.pt", "..\\x", ".."],
)
def test_names_that_could_leave_the_job_are_refused(store: ArtifactStore, name: str) -> None:
    with pytest.raises(ArtifactNameError):
        store.resolve(JOB, name)


def test_a_symlink_escaping_the_job_is_refused(store: ArtifactStore, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("no")
    os.symlink(secret, store.run_dir(JOB) / "leak.pt")
    os.symlink(tmp_path, store.run_dir(JOB) / "outside")
    with pytest.raises(ArtifactNameError, match="outside the job"):
        store.resolve(JOB, "run/leak.pt")
    with pytest.raises(ArtifactNameError, match="outside the job"):
        store.resolve(JOB, "run/outside/secret.txt")
    names = [name for name, _, _ in store.scan(JOB)]
    assert "run/leak.pt" not in names and not any(n.startswith("run/outside") for n in names)


def test_a_symlink_inside_the_job_is_followed(store: ArtifactStore) -> None:
    os.symlink(store.run_dir(JOB) / "student.pt", store.run_dir(JOB) / "latest.pt")
    assert store.resolve(JOB, "run/latest.pt").read_bytes() == b"student.pt"


@pytest.mark.parametrize("job_id", ["..", "a/b", "", "x" * 65, "/tmp"])
def test_job_ids_are_checked(store: ArtifactStore, job_id: str) -> None:
    with pytest.raises(ArtifactNameError):
        store.job_dir(job_id)


def test_scan_lists_files_with_their_kind(store: ArtifactStore) -> None:
    found = {name: kind for name, kind, path in store.scan(JOB) if path.is_file()}
    assert found == {
        "logs.txt": "logs",
        "run/checkpoints/best.pt": "best",
        "run/checkpoints/ckpt_00000004.pt": "checkpoint",
        "run/eval.json": "eval",
        "run/metrics.jsonl": "metrics",
        "run/result.json": "other",
        "run/spec.yaml": "spec",
        "run/student.pt": "student",
        "run/tensorboard/events.out.tfevents.1.host": "tensorboard",
    }
    assert [name for name, _, _ in store.scan(JOB)] == sorted(found)
    assert store.scan("f" * 32) == []


def test_kinds_of_names() -> None:
    assert artifact_kind("run/checkpoints/ckpt_00000100.pt") == "checkpoint"
    assert artifact_kind("run/student.pt.bak") == "other"
    assert artifact_kind("worker.log") == "logs"


def test_sha256_matches_hashlib(tmp_path: Path) -> None:
    data = os.urandom((1 << 20) * 2 + 123)  # spans chunks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert ArtifactStore.sha256(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert file_sha256(empty) == hashlib.sha256(b"").hexdigest()
