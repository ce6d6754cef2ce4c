"""API test helpers: an app over the test's database and broker, a dataset under its roots,
and ways to move a job along as a worker would (through `jobs.lifecycle`, not raw UPDATEs)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from jobs.settings import Settings
from tests.conftest import png_bytes, tiny_model, tiny_spec_dict


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def dataset(service_settings: Settings) -> dict[str, Path]:
    """Paths of a two-image COCO split pair under the dataset root (one batch of the tiny
    spec's 2). The API checks the annotations and each image's header, never its pixels;
    nothing here trains."""
    root = service_settings.dataset_roots[0] / "digits"
    paths = {}
    coco = {
        "images": [
            {"id": i + 1, "file_name": f"{i}.png", "width": 64, "height": 64} for i in range(2)
        ],
        "annotations": [
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 10, 10]}
            for i in range(2)
        ],
        "categories": [{"id": 1, "name": "digit"}],
    }
    for split in ("train", "val"):
        images = root / split / "images"
        images.mkdir(parents=True)
        for i in range(2):
            (images / f"{i}.png").write_bytes(png_bytes(64, 64))
        annotations = root / split / "annotations.json"
        annotations.write_text(json.dumps(coco))
        paths[f"{split}_images"], paths[f"{split}_annotations"] = images, annotations
    return paths


def job_spec(paths: dict[str, Path], name: str = "job", **sections: Any) -> dict[str, Any]:
    return tiny_spec_dict(paths, name=name, **sections)


def distill_spec(paths: dict[str, Path], teacher_weights: str, name: str = "d") -> dict[str, Any]:
    return job_spec(
        paths,
        name=name,
        kind="distill",
        teacher=tiny_model(backbone="resnet34", weights=teacher_weights),
        distill={"method": "mimic"},
    )


@pytest.fixture
def app(service_settings: Settings) -> FastAPI:
    from api.app import create_app

    app = create_app(service_settings)
    app.state.sse_poll_seconds = 0.05
    return app


@pytest.fixture
def client(app: FastAPI, admin: tuple[Any, str]) -> Iterator[TestClient]:
    """alice (team alpha) calling the API."""
    with TestClient(app, headers=bearer(admin[1])) as c:
        yield c


def submit(client: TestClient, spec: dict[str, Any], **headers: str) -> dict[str, Any]:
    r = client.post("/v1/jobs", json=spec, headers=headers)
    assert r.status_code in (200, 201), r.text
    return r.json()


def run_to_end(
    settings: Settings,
    job_id: str,
    *,
    state: str = "succeeded",
    files: dict[str, bytes] | None = None,
) -> None:
    """Claim, write `files` (name -> bytes) as artifacts, and finish, as a worker would."""
    from jobs.db import session_scope
    from jobs.lifecycle import claim_job, finish_job
    from jobs.models import JobState
    from jobs.progress import record_artifact

    assert settings.artifacts_dir is not None
    with session_scope(settings.database_url) as session:
        assert claim_job(session, job_id, worker="w#1", lease_seconds=60) is not None
    for name, data in (files or {}).items():
        path = Path(settings.artifacts_dir) / job_id / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        with session_scope(settings.database_url) as session:
            record_artifact(
                session, job_id, worker="w#1", attempt=1, name=name, kind="other", path=path
            )
    with session_scope(settings.database_url) as session:
        error = None if state == "succeeded" else "it broke"
        assert finish_job(
            session, job_id, worker="w#1", attempt=1, state=JobState(state), error=error
        )


def succeeded_with_student(
    client: TestClient, settings: Settings, paths: dict[str, Path], name: str = "trained"
) -> str:
    """The id of a job that succeeded with a real `run/student.pt`: `tiny_model`'s detector
    (resnet18, fpn_channels 16, GroupNorm) with random weights, exported as trained on the
    categories of `paths`' training split."""
    from tests.conftest import export_tiny_student

    categories = json.loads(Path(paths["train_annotations"]).read_text())["categories"]
    exported = export_tiny_student(Path(settings.data_dir) / f"{name}-student.pt", categories)
    job = submit(client, job_spec(paths, name=name))
    run_to_end(settings, job["id"], files={"run/student.pt": exported.read_bytes()})
    return str(job["id"])
