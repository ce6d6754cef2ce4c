"""Disk: checkpoint retention after success, deleting jobs and artifacts, disk per team."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from jobs import admin as admin_commands
from jobs.artifacts import ArtifactStore
from jobs.db import session_scope
from jobs.models import Artifact, Job, JobEvent, MetricPoint
from jobs.retention import apply_retention, purge_deleted
from jobs.settings import Settings
from tests.api.conftest import (
    bearer,
    distill_spec,
    job_spec,
    run_to_end,
    submit,
    succeeded_with_student,
)
from tests.conftest import tiny_model

CHECKPOINTS = {
    "run/checkpoints/attempt-1/ckpt_10.pt": b"a" * 10,
    "run/checkpoints/attempt-2/ckpt_20.pt": b"b" * 20,
    "run/checkpoints/attempt-2/ckpt_30.pt": b"c" * 30,
    "run/checkpoints/attempt-2/best.pt": b"d" * 40,
    "run/student.pt": b"e" * 50,
    "logs.txt": b"log\n",
}


def _finished(client: TestClient, settings: Settings, dataset: dict[str, Path], **spec: Any) -> str:
    job = submit(client, job_spec(dataset, **spec))
    run_to_end(settings, job["id"], files=CHECKPOINTS)
    return job["id"]


def _retain(settings: Settings, job_id: str) -> list[str]:
    assert settings.artifacts_dir is not None
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        return apply_retention(session, ArtifactStore(settings.artifacts_dir), job)


def _names(client: TestClient, job_id: str) -> set[str]:
    return {a["name"] for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()}


def test_a_succeeded_job_keeps_its_latest_and_best_checkpoints_by_default(
    client: TestClient, service_settings: Settings, dataset: dict[str, Path]
) -> None:
    job_id = _finished(client, service_settings, dataset)
    assert sorted(_retain(service_settings, job_id)) == [
        "run/checkpoints/attempt-1/ckpt_10.pt",
        "run/checkpoints/attempt-2/ckpt_20.pt",
    ]
    assert _names(client, job_id) == set(CHECKPOINTS) - {
        "run/checkpoints/attempt-1/ckpt_10.pt",
        "run/checkpoints/attempt-2/ckpt_20.pt",
    }
    folder = Path(service_settings.artifacts_dir or "") / job_id
    assert not (folder / "run/checkpoints/attempt-2/ckpt_20.pt").exists()
    assert (folder / "run/checkpoints/attempt-2/ckpt_30.pt").exists()
    assert _retain(service_settings, job_id) == []  # nothing more to drop
    events = client.get(f"/v1/jobs/{job_id}").json()
    assert events["state"] == "succeeded"


def test_the_jobs_own_policy_wins_over_its_teams(
    client: TestClient, service_settings: Settings, dataset: dict[str, Path], admin: tuple
) -> None:
    team = admin[0].team.name
    policy = admin_commands.set_team_retention(service_settings, team, {"keep_latest": 0})
    assert (policy.keep_latest, policy.keep_best) == (0, True)
    by_team = _finished(client, service_settings, dataset, name="team")
    _retain(service_settings, by_team)
    assert _names(client, by_team) == {
        "run/checkpoints/attempt-2/best.pt",
        "run/student.pt",
        "logs.txt",
    }
    own = _finished(
        client,
        service_settings,
        dataset,
        name="own",
        retention={"keep_latest": 2, "keep_best": False},
    )
    _retain(service_settings, own)
    assert _names(client, own) == {
        "run/checkpoints/attempt-2/ckpt_20.pt",
        "run/checkpoints/attempt-2/ckpt_30.pt",
        "run/student.pt",
        "logs.txt",
    }
    failed = submit(client, job_spec(dataset, name="failed"))
    run_to_end(service_settings, failed["id"], state="failed", files=CHECKPOINTS)
    assert _retain(service_settings, failed["id"]) == []  # its retry resumes from them
    with session_scope(service_settings.database_url) as session:
        kinds = session.scalars(select(JobEvent.kind).where(JobEvent.job_id == by_team))
        assert "retention" in list(kinds)
    assert admin_commands.set_team_retention(service_settings, team, None).keep_latest == 1


def test_deleting_a_job_removes_its_files_and_rows(
    client: TestClient,
    service_settings: Settings,
    dataset: dict[str, Path],
    other_team_user: tuple[Any, str],
) -> None:
    running = submit(client, job_spec(dataset, name="queued"))
    r = client.delete(f"/v1/jobs/{running['id']}")
    assert r.status_code == 409 and "cancel it first" in r.json()["detail"]

    teacher = _finished(client, service_settings, dataset, name="teacher")
    student = submit(client, distill_spec(dataset, f"job:{teacher}"))
    r = client.delete(f"/v1/jobs/{teacher}")
    assert r.status_code == 409 and student["id"] in r.json()["detail"]
    r = client.delete(f"/v1/jobs/{teacher}/artifacts/run/student.pt")
    assert r.status_code == 409
    theirs = client.delete(f"/v1/jobs/{teacher}", headers=bearer(other_team_user[1]))
    assert theirs.status_code == 404  # another team's job does not exist for them
    client.post(f"/v1/jobs/{student['id']}/cancel")

    before = client.get("/v1/queue").json()["team_disk_bytes"]
    assert before == sum(map(len, CHECKPOINTS.values()))
    r = client.delete(f"/v1/jobs/{teacher}/artifacts/run/checkpoints/attempt-2/best.pt")
    assert r.status_code == 200 and r.json()["freed_bytes"] == 40
    r = client.delete(f"/v1/jobs/{teacher}/artifacts/run/checkpoints/attempt-2/best.pt")
    assert r.status_code == 404
    r = client.delete(f"/v1/jobs/{teacher}/artifacts/../secret")
    assert r.status_code == 404

    r = client.delete(f"/v1/jobs/{teacher}")
    assert r.status_code == 200, r.text
    assert r.json() == {"id": teacher, "name": None, "freed_bytes": before - 40}
    assert client.get(f"/v1/jobs/{teacher}").status_code == 404
    assert not (Path(service_settings.artifacts_dir or "") / teacher).exists()
    assert client.get("/v1/queue").json()["team_disk_bytes"] == 0
    with session_scope(service_settings.database_url) as session:
        assert session.get(Job, student["id"]).teacher_job_id is None
        for table in (Artifact, JobEvent, MetricPoint):
            count = select(func.count()).select_from(table).where(table.job_id == teacher)
            assert session.scalar(count) == 0
    metrics = client.get("/metrics").text
    assert "hmkd_team_disk_bytes" in metrics
    # the student's teacher file went with the teacher: retried, it could only fail
    r = client.post(f"/v1/jobs/{student['id']}/retry")
    assert r.status_code == 409 and "teacher.weights" in r.json()["detail"], r.text
    assert client.get(f"/v1/jobs/{student['id']}").json()["state"] == "cancelled"


def test_a_retry_whose_job_weights_were_deleted_since_is_refused(
    client: TestClient, service_settings: Settings, dataset: dict[str, Path]
) -> None:
    """An evaluation of job A's student and a distillation with it as teacher have ended, so
    A's run/student.pt may be deleted. Retried, either was queued with weights that are gone
    and could only fail when it started: a 409 naming the missing artifact, the job left as
    it was."""
    trained = succeeded_with_student(client, service_settings, dataset)
    student = tiny_model(weights=f"job:{trained}")
    evaluation = submit(client, job_spec(dataset, name="eval", kind="evaluate", student=student))
    spec = job_spec(dataset, name="distill", kind="distill", distill={"method": "mimic"})
    spec["teacher"] = {"weights": f"job:{trained[:8]}"}
    distilled = submit(client, spec)
    run_to_end(service_settings, evaluation["id"], state="failed")
    assert client.post(f"/v1/jobs/{distilled['id']}/cancel").json()["state"] == "cancelled"

    # while the student.pt is kept, a retry is queued (and keeps the file from deletion)
    r = client.post(f"/v1/jobs/{evaluation['id']}/retry")
    assert r.status_code == 200 and r.json()["state"] == "queued", r.text
    assert client.delete(f"/v1/jobs/{trained}/artifacts/run/student.pt").status_code == 409
    assert client.post(f"/v1/jobs/{evaluation['id']}/cancel").json()["state"] == "cancelled"

    r = client.delete(f"/v1/jobs/{trained}/artifacts/run/student.pt")
    assert r.status_code == 200, r.text
    for job, field in ((evaluation, "student.weights"), (distilled, "teacher.weights")):
        r = client.post(f"/v1/jobs/{job['id']}/retry")
        assert r.status_code == 409, r.text
        detail = r.json()["detail"]
        assert field in detail and f"job {trained}'s artifact run/student.pt" in detail, detail
        again = client.get(f"/v1/jobs/{job['id']}").json()
        assert again["state"] == "cancelled", again


def test_a_folder_left_by_an_interrupted_deletion_is_purged(service_settings: Settings) -> None:
    assert service_settings.artifacts_dir is not None
    store = ArtifactStore(service_settings.artifacts_dir)
    left = store.root / ".deleted-abc-1234"
    (left / "run").mkdir(parents=True)
    (left / "run" / "student.pt").write_bytes(b"x")
    assert purge_deleted(store) == [left]
    assert not left.exists()
