"""The service's `hmkd` commands: admin commands on the database, client commands over HTTP."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select
from typer.testing import CliRunner

from client.service_cli import app
from jobs.auth import SHOWN_PREFIX_CHARS
from jobs.db import session_scope
from jobs.models import Job
from jobs.settings import Settings
from tests.api.conftest import job_spec, run_to_end

runner = CliRunner()


def test_admin_commands(empty_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HMKD_DATABASE_URL", empty_db_url)
    monkeypatch.setenv("HMKD_DATA_DIR", str(tmp_path))
    res = runner.invoke(app, ["users", "create", "carol", "--team", "gamma"])
    assert res.exit_code == 2 and "hmkd db upgrade" in res.output
    res = runner.invoke(app, ["db", "upgrade"])
    assert res.exit_code == 0 and "upgraded" in res.output, res.output
    res = runner.invoke(app, ["users", "create", "carol", "--team", "gamma", "--admin"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1].startswith("hmkd_")
    res = runner.invoke(app, ["tokens", "create", "--user", "carol"])
    assert res.exit_code == 0 and res.stdout.strip().splitlines()[-1].startswith("hmkd_")
    res = runner.invoke(app, ["tokens", "create", "--user", "nobody"])
    assert res.exit_code == 2 and "hmkd users create nobody" in res.output

    # tokens are listed by prefix only, revoked one by one, or all of a user's at once
    second = runner.invoke(app, ["tokens", "create", "--user", "carol"])
    res_token = second.stdout.strip().splitlines()[-1]
    listed = runner.invoke(app, ["tokens", "list", "--user", "carol"])
    assert listed.exit_code == 0 and listed.stdout.count("live") == 3
    assert res_token not in listed.stdout  # never the token itself
    shown = res_token[:SHOWN_PREFIX_CHARS]
    assert shown in listed.stdout
    res = runner.invoke(app, ["tokens", "revoke", shown + "x"])  # not cut to the prefix
    assert res.exit_code == 2 and "no live token" in res.output
    res = runner.invoke(app, ["tokens", "revoke", shown])
    assert res.exit_code == 0 and "revoked token" in res.output, res.output
    res = runner.invoke(app, ["tokens", "revoke", res_token])  # the whole token, now revoked
    assert res.exit_code == 2 and "no live token" in res.output
    res = runner.invoke(app, ["users", "disable", "carol"])
    assert res.exit_code == 0 and "2 live token(s) revoked" in res.output, res.output
    listed = runner.invoke(app, ["tokens", "list"])
    assert listed.stdout.count("revoked") == 3 and "live" not in listed.stdout

    res = runner.invoke(app, ["teams", "limit", "gamma", "--max-running", "2"])
    assert res.exit_code == 0 and "at most 2 running" in res.output, res.output
    res = runner.invoke(app, ["teams", "limit", "gamma", "--default"])
    assert res.exit_code == 0 and "unlimited" in res.output, res.output
    res = runner.invoke(app, ["teams", "limit", "nobody", "--max-running", "2"])
    assert res.exit_code == 2 and "no team 'nobody'" in res.output
    res = runner.invoke(app, ["teams", "limit", "gamma"])
    assert res.exit_code == 2 and "--max-running N or --default" in res.output

    res = runner.invoke(app, ["teams", "set", "gamma", "--share", "3", "--gpu-quota", "8"])
    assert res.exit_code == 0 and "share 3, GPU quota 8" in res.output, res.output
    res = runner.invoke(app, ["teams", "set", "gamma", "--no-gpu-quota"])
    assert res.exit_code == 0 and "share 3, no GPU quota" in res.output
    res = runner.invoke(app, ["teams", "set", "gamma"])
    assert res.exit_code == 2 and "--share" in res.output
    res = runner.invoke(app, ["teams", "list"])
    assert res.exit_code == 0 and "gamma" in res.stdout

    res = runner.invoke(app, ["teams", "retention", "gamma", "--keep-latest", "3"])
    assert res.exit_code == 0 and "keep 3 checkpoint(s) and best.pt" in res.output, res.output
    res = runner.invoke(app, ["teams", "retention", "gamma", "--drop-best"])  # keeps the 3
    assert res.exit_code == 0 and "keep 3 checkpoint(s) without best.pt" in res.output
    res = runner.invoke(app, ["teams", "retention", "gamma", "--default"])
    assert res.exit_code == 0 and "keep 1 checkpoint(s) and best.pt" in res.output
    res = runner.invoke(app, ["teams", "retention", "gamma", "--default", "--keep-latest", "2"])
    assert res.exit_code == 2


@pytest.fixture
def cli_env(live_api: str, admin: tuple[Any, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HMKD_API_URL", live_api)
    monkeypatch.setenv("HMKD_TOKEN", admin[1])


def _spec_file(
    dataset: dict[str, Path], folder: Path, file: str = "spec.yaml", **sections: Any
) -> Path:
    """A YAML spec with paths relative to its own folder, as users write them."""
    spec = job_spec(dataset, **sections)
    root = dataset["train_images"].parents[2]  # the dataset root holding digits/
    for split in spec["data"].values():
        for key in ("images", "annotations"):
            split[key] = str(Path(split[key]).relative_to(root))
    path = root / file
    path.write_text(yaml.safe_dump(spec))
    return path


def test_submit_status_cancel_and_list(
    cli_env: None, dataset: dict[str, Path], tmp_path: Path
) -> None:
    spec = _spec_file(dataset, tmp_path, name="from-cli")
    res = runner.invoke(app, ["submit", str(spec), "-q", "--set", "resources.priority=3"])
    assert res.exit_code == 0, res.output
    job_id = res.stdout.strip()
    assert len(job_id) == 32
    res = runner.invoke(app, ["status", job_id, "--json"])
    assert res.exit_code == 0 and '"priority": 3' in res.stdout
    res = runner.invoke(app, ["jobs"])
    assert res.exit_code == 0 and job_id in res.stdout and "from-cli" in res.stdout
    res = runner.invoke(app, ["cancel", job_id])
    assert res.exit_code == 0 and "cancelled" in res.stdout
    res = runner.invoke(app, ["cancel", job_id])
    assert res.exit_code == 1 and "already cancelled" in res.output
    res = runner.invoke(app, ["retry", job_id])
    assert res.exit_code == 0 and "queued" in res.stdout
    res = runner.invoke(app, ["queue"])
    assert res.exit_code == 0 and "default" in res.stdout


def test_submit_chains_a_teacher_and_its_student(
    cli_env: None, dataset: dict[str, Path], tmp_path: Path
) -> None:
    teacher = _spec_file(dataset, tmp_path, "teacher.yaml", name="t")
    distill = {"kind": "distill", "distill": {"method": "mimic"}}
    student = _spec_file(dataset, tmp_path, "student.yaml", name="s", **distill)
    named = _spec_file(
        dataset, tmp_path, "named.yaml", name="s", teacher={"weights": "job:abcdef"}, **distill
    )
    res = runner.invoke(app, ["submit", str(teacher), str(named), "-q"])
    assert res.exit_code == 2 and "named.yaml:teacher.weights" in "".join(res.output.split())
    res = runner.invoke(app, ["submit", str(teacher), str(teacher)])
    assert res.exit_code == 2 and "kinddistill" in "".join(res.output.split())
    assert json.loads(runner.invoke(app, ["jobs", "--json"]).stdout)["items"] == []  # none made

    res = runner.invoke(app, ["submit", str(teacher), str(student), "-q"])
    assert res.exit_code == 0, res.output
    first, second = res.stdout.split()
    res = runner.invoke(app, ["status", second, "--json"])
    shown = json.loads(res.stdout)
    assert shown["state"] == "waiting" and shown["teacher_job_id"] == first
    assert shown["spec"]["teacher"]["weights"] == f"job:{first}"


def test_submit_bad_path_names_the_field(
    cli_env: None, dataset: dict[str, Path], tmp_path: Path
) -> None:
    spec = _spec_file(dataset, tmp_path)
    res = runner.invoke(app, ["submit", str(spec), "--set", "data.val.images=/etc"])
    assert res.exit_code == 2 and "data.val.images" in res.output


def test_submit_follow_prints_ap(
    cli_env: None, dataset: dict[str, Path], tmp_path: Path, service_settings: Settings
) -> None:
    from jobs.lifecycle import claim_job, finish_job
    from jobs.models import JobState
    from jobs.progress import record_evaluation

    url = service_settings.database_url

    def worker() -> None:
        job_id = None
        while job_id is None:
            time.sleep(0.1)
            with session_scope(url) as s:
                job_id = s.scalar(select(Job.id).where(Job.name == "followed"))
        with session_scope(url) as s:
            claim_job(s, job_id, worker="w#1", lease_seconds=60)
        time.sleep(0.2)
        with session_scope(url) as s:
            metrics = {"AP": 0.4321, "AP_S": 0.1234, "AP50": 0.6}
            record_evaluation(
                s, job_id, worker="w#1", attempt=1, iteration=4, metrics=metrics, metric_name="AP_S"
            )
            finish_job(s, job_id, worker="w#1", attempt=1, state=JobState.succeeded)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        spec = _spec_file(dataset, tmp_path, name="followed")
        res = runner.invoke(app, ["submit", str(spec), "--follow"])
    finally:
        thread.join()
    assert res.exit_code == 0, res.output
    assert "AP 43.2  AP_S 12.3" in res.stdout


def test_download_and_logs(
    cli_env: None,
    dataset: dict[str, Path],
    tmp_path: Path,
    service_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = _spec_file(dataset, tmp_path)
    job_id = runner.invoke(app, ["submit", str(spec), "-q"]).stdout.strip()
    run_to_end(service_settings, job_id, files={"run/student.pt": b"student", "logs.txt": b"hi\n"})
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["download", job_id])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "student.pt").read_bytes() == b"student"
    res = runner.invoke(app, ["download", job_id, "run/student.pt", "-o", str(tmp_path / "x.pt")])
    assert res.exit_code == 0 and (tmp_path / "x.pt").read_bytes() == b"student"
    res = runner.invoke(app, ["download", job_id, "run/missing.pt"])
    assert res.exit_code == 2 and "no artifact" in res.output
    res = runner.invoke(app, ["logs", job_id, "-f"])
    assert res.exit_code == 0 and res.stdout == "hi\n"
    res = runner.invoke(app, ["rm", job_id, "--artifact", "logs.txt"])
    assert res.exit_code == 0 and "deleted logs.txt of job" in res.stdout, res.output
    res = runner.invoke(app, ["rm", job_id, "0" * 32])  # one deleted, one unknown: exit 1
    assert res.exit_code == 1 and f"deleted job {job_id} (7 bytes)" in res.stdout
    assert "not found" in res.output


def test_serve_refuses_an_unmigrated_team_database(
    empty_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if empty_db_url.startswith("sqlite"):
        pytest.skip("the embedded default migrates its SQLite database by itself")
    monkeypatch.setenv("HMKD_DATABASE_URL", empty_db_url)
    monkeypatch.setenv("HMKD_DATA_DIR", str(tmp_path))
    res = runner.invoke(app, ["serve", "--no-worker", "--port", "1"])
    assert res.exit_code == 2 and "hmkd db upgrade" in res.output


def test_datasets_upload_list_show_and_resume(
    cli_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from client.cli import _pack
    from client.cli import app as main_app
    from client.sdk import ApiError, Client
    from tests.api.test_datasets_api import _files

    monkeypatch.setenv("HMKD_DATA_DIR", str(tmp_path / "home"))
    folder = tmp_path / "export"
    for name, data in _files().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    res = runner.invoke(main_app, ["datasets", "upload", "drones", str(folder)])
    assert res.exit_code == 0, res.output
    assert "dataset: drones@1" in res.stdout and "person 1, car 2" in res.stdout

    # an upload interrupted after its first chunk resumes from the server's offset
    packed = tmp_path / "packed"
    packed.mkdir()
    archive = _pack(folder, packed)
    with Client() as client:
        upload = client._call(
            "POST", "/v1/datasets/uploads", json={"name": "drones", "size": archive.stat().st_size}
        ).json()
        client._call(
            "PUT",
            f"/v1/datasets/uploads/{upload['id']}",
            params={"offset": 0},
            content=archive.read_bytes()[:1000],
        )
    key = f"{archive.resolve()}|{archive.stat().st_size}|drones"
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "home" / "uploads.json").write_text(json.dumps({key: upload["id"]}))
    res = runner.invoke(main_app, ["datasets", "upload", "drones", str(archive)])
    assert res.exit_code == 0 and "drones@2" in res.stdout, res.output
    with Client() as client, pytest.raises(ApiError) as gone:
        client._call("GET", f"/v1/datasets/uploads/{upload['id']}")
    assert gone.value.status == 404  # the upload became drones@2
    assert json.loads((tmp_path / "home" / "uploads.json").read_text()) == {}

    res = runner.invoke(main_app, ["datasets", "list"])
    assert res.exit_code == 0 and "drones@2" in res.stdout and "drones@1" in res.stdout
    res = runner.invoke(main_app, ["datasets", "show", "drones@1", "--min-size", "256"])
    assert res.exit_code == 0 and "at input" in res.stdout, res.output
    res = runner.invoke(main_app, ["datasets", "show", "nothing"])
    assert res.exit_code == 2 and "no dataset 'nothing'" in res.output


def test_the_shipped_dataset_specs_chain_a_teacher_and_its_student(
    cli_env: None, tiny_digits: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a new user would: upload a COCO export as `smalldigits`, then submit the shipped
    teacher and HMKD specs as a pipeline, without a server path in either."""
    from client.cli import app as main_app

    monkeypatch.setenv("HMKD_DATA_DIR", str(tmp_path / "home"))
    root = tiny_digits["train_annotations"].parents[1]
    res = runner.invoke(main_app, ["datasets", "upload", "smalldigits", str(root)])
    assert res.exit_code == 0 and "smalldigits@1" in res.stdout, res.output
    repo = Path(__file__).resolve().parents[2] / "configs" / "service" / "dataset"
    res = runner.invoke(app, ["submit", str(repo / "teacher.yaml"), str(repo / "hmkd.yaml"), "-q"])
    assert res.exit_code == 0, res.output
    teacher, student = res.stdout.split()
    shown = json.loads(runner.invoke(app, ["status", student, "--json"]).stdout)
    assert shown["state"] == "waiting" and shown["teacher_job_id"] == teacher
    assert shown["spec"]["dataset"] == "smalldigits@1" and shown["method"] == "hmkd"
