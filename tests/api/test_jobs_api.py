"""`/v1/jobs` as a client sees it: submit, validate, list, page, cancel, retry, logs, events."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from client.sdk import parse_sse
from jobs.db import session_scope
from jobs.models import Job
from jobs.settings import Settings
from tests.api.conftest import (
    bearer,
    distill_spec,
    job_spec,
    run_to_end,
    submit,
    succeeded_with_student,
)
from tests.conftest import export_tiny_student, png_bytes, tiny_model


def _count_jobs(settings: Settings) -> int:
    with session_scope(settings.database_url) as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def test_create_then_idempotent_repeat(
    client: TestClient, dataset: dict[str, Path], service_settings: Settings
) -> None:
    spec = job_spec(dataset, name="teacher-r34")
    first = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 201, first.text
    job = first.json()
    assert job["state"] == "queued" and job["queue_position"] == 1
    assert job["dispatched"] is True  # published to the test's broker
    assert first.headers["location"] == f"/v1/jobs/{job['id']}"

    again = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    assert _count_jobs(service_settings) == 1

    other = dict(spec, name="something else")
    clash = client.post("/v1/jobs", json=other, headers={"Idempotency-Key": "k-1"})
    assert clash.status_code == 409 and "Idempotency-Key" in clash.json()["detail"]


def test_bad_spec_is_422_with_field_paths(client: TestClient, dataset: dict[str, Path]) -> None:
    spec = job_spec(dataset, schedule={"lr": -1}, resources={"gpus": 0, "queue": "bad queue!"})
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 422
    fields = {e["field"] for e in r.json()["detail"]}
    assert {"schedule.lr", "resources.queue"} <= fields

    r = client.post("/v1/jobs", json={**job_spec(dataset), "colour": "blue"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "colour"

    r = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


@pytest.mark.parametrize("where", ["outside", "missing", "relative"])
def test_dataset_paths_confined_to_roots(
    client: TestClient, dataset: dict[str, Path], tmp_path: Path, where: str
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    bad = {
        "outside": str(outside),
        "missing": str(dataset["val_images"].parent / "nope"),
        "relative": "digits/val/images",
    }[where]
    spec = job_spec(dataset)
    spec["data"]["val"]["images"] = bad
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["field"] == "data.val.images"
    assert error["loc"] == ["body", "data", "val", "images"]


def test_teacher_job_must_be_visible_to_the_team(
    client: TestClient,
    dataset: dict[str, Path],
    service_settings: Settings,
    other_team_user: tuple[Any, str],
) -> None:
    theirs = client.post(
        "/v1/jobs", json=job_spec(dataset, name="bob-teacher"), headers=bearer(other_team_user[1])
    ).json()
    run_to_end(service_settings, theirs["id"], files={"run/student.pt": b"weights"})
    unknown = "0" * 32
    for ref in (theirs["id"], unknown):
        r = client.post("/v1/jobs", json=distill_spec(dataset, f"job:{ref}"))
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["field"] == "teacher.weights"
        assert "no job" in r.json()["detail"][0]["msg"]

    mine = submit(client, job_spec(dataset, name="alice-teacher"))
    run_to_end(service_settings, mine["id"], files={"run/student.pt": b"weights"})
    ok = submit(client, distill_spec(dataset, f"job:{mine['id']}"))
    assert ok["teacher_job_id"] == mine["id"] and ok["kind"] == "distill"
    # a unique prefix of at least 6 characters names the job as its whole id does
    short = submit(client, distill_spec(dataset, f"job:{mine['id'][:10]}"))
    assert short["teacher_job_id"] == mine["id"]
    assert short["spec"]["teacher"]["weights"] == f"job:{mine['id'][:10]}"
    r = client.post("/v1/jobs", json=distill_spec(dataset, "job:abcde"))  # too short: a path
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "teacher.weights"


def test_a_teacher_given_only_as_an_unknown_job_is_blamed_on_its_weights(
    client: TestClient,
    dataset: dict[str, Path],
    service_settings: Settings,
    other_team_user: tuple[Any, str],
) -> None:
    """`teacher: {weights: job:<id>}` takes everything else from the job; an id that names
    no job of the team was reported as the defaulted teacher.min_size instead."""
    theirs = client.post(
        "/v1/jobs", json=job_spec(dataset, name="bob-teacher"), headers=bearer(other_team_user[1])
    ).json()
    run_to_end(service_settings, theirs["id"], files={"run/student.pt": b"weights"})
    spec = job_spec(dataset, name="d", kind="distill", distill={"method": "mimic"})
    for ref in (theirs["id"], "0" * 32):  # another team's job, and one that is nobody's
        spec["teacher"] = {"weights": f"job:{ref}"}
        r = client.post("/v1/jobs", json=spec)
        assert r.status_code == 422, r.text
        (error,) = r.json()["detail"]
        assert error["field"] == "teacher.weights" and "no job" in error["msg"], error


def test_a_job_teacher_brings_its_architecture_from_its_student_file(
    client: TestClient,
    dataset: dict[str, Path],
    service_settings: Settings,
    tiny_digits: dict[str, Path],
    tiny_teacher: Path,
) -> None:
    digits = json.loads(tiny_digits["train_annotations"].read_text())["categories"]
    for split in ("train", "val"):  # the categories the teacher's weights were trained on
        _write_coco(dataset[f"{split}_annotations"], categories=digits)
    mine = submit(client, job_spec(dataset, name="teacher"))
    run_to_end(service_settings, mine["id"], files={"run/student.pt": tiny_teacher.read_bytes()})
    spec = job_spec(dataset, name="d", kind="distill", distill={"method": "mimic"})
    spec["teacher"] = {"weights": f"job:{mine['id'][:8]}"}  # nothing else
    made = submit(client, spec)
    teacher = made["spec"]["teacher"]
    assert (teacher["backbone"], teacher["fpn_channels"]) == ("resnet34", 32)
    assert teacher["min_size"] == spec["student"]["min_size"] == 64
    assert teacher["backbone_norm"] != "auto"  # what the weights were trained with
    # a teacher told to read the images twice as large takes max_size twice as large too
    spec["teacher"] = {"weights": f"job:{mine['id']}", "min_size": 128}
    larger = submit(client, spec)["spec"]["teacher"]
    assert (larger["min_size"], larger["max_size"]) == (128, 2 * spec["student"]["max_size"])
    spec["teacher"] = {"weights": f"job:{mine['id']}", "min_size": 96}  # 1.5x: refused
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "teacher.min_size"
    spec["teacher"] = {"weights": f"job:{mine['id']}", "fpn_channels": 16}
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 422
    detail = r.json()["detail"][0]
    assert detail["field"] == "teacher.fpn_channels" and "built with 32" in detail["msg"]


def test_a_student_from_a_job_must_be_the_detector_its_weights_were_built_as(
    client: TestClient, dataset: dict[str, Path], service_settings: Settings
) -> None:
    """`student.weights: job:<id>` (an evaluation, or training that starts from it) loads that
    job's student.pt into the spec's student. A student described otherwise was queued and
    failed in the worker (`build_detector`: the weights miss the model's keys); it is a 422
    naming student.weights at submit, by the rule a `job:` teacher is checked with."""
    trained = succeeded_with_student(client, service_settings, dataset)  # resnet18, 16, gn
    ref = f"job:{trained}"
    cases = [
        (
            "evaluate",
            tiny_model(backbone="resnet34"),
            "student.backbone is 'resnet34'",
            "'resnet18'",
        ),
        ("evaluate", tiny_model(fpn_channels=32), "student.fpn_channels is 32", "built with 16"),
        ("train", tiny_model(arch="retinanet"), "student.arch is 'retinanet'", "'faster_rcnn'"),
        ("train", tiny_model(backbone_norm="bn"), "student.backbone_norm is 'bn'", "'gn'"),
        (
            "evaluate",
            {k: v for k, v in tiny_model().items() if k != "fpn_channels"},
            "student.fpn_channels (left out: its default) is 256",
            "built with 16",
        ),
    ]
    for kind, student, given, built in cases:
        spec = job_spec(dataset, name="from-a-job", kind=kind)
        spec["student"] = {**student, "weights": ref}  # job_spec would merge in tiny_model
        r = client.post("/v1/jobs", json=spec)
        assert r.status_code == 422, (student, r.text)
        (error,) = r.json()["detail"]
        assert error["field"] == "student.weights" and error["type"] == "invalid_job", error
        assert error["loc"] == ["body", "student", "weights"]
        assert given in error["msg"] and built in error["msg"] and trained in error["msg"], error
    assert _count_jobs(service_settings) == 1  # the trained job only

    # the detector the weights were built as, by a prefix of the id too: evaluated, or trained on
    evaluation = submit(client, job_spec(dataset, kind="evaluate", student=tiny_model(weights=ref)))
    assert evaluation["state"] == "queued"
    warm = tiny_model(weights=f"job:{trained[:8]}", backbone_norm="gn")
    assert submit(client, job_spec(dataset, name="warm", student=warm))["state"] == "queued"
    # anchor sizes shape no weight: the same weights may train with other anchors
    other_anchors = tiny_model(weights=ref, anchor_sizes=[4, 8, 16, 32, 64])
    assert submit(client, job_spec(dataset, name="anchors", student=other_anchors))["state"] == (
        "queued"
    )

    # weights still to come, or deleted since, are refused by name too
    unfinished = submit(client, job_spec(dataset, name="unfinished"))
    gone = succeeded_with_student(client, service_settings, dataset, name="gone")
    r = client.delete(f"/v1/jobs/{gone}/artifacts/run/student.pt")
    assert r.status_code == 200, r.text
    for source, words in ((unfinished["id"], "not succeeded"), (gone, "has no student.pt")):
        spec = job_spec(dataset, kind="evaluate", student=tiny_model(weights=f"job:{source}"))
        r = client.post("/v1/jobs", json=spec)
        assert r.status_code == 422, r.text
        (error,) = r.json()["detail"]
        assert error["field"] == "student.weights" and words in error["msg"], error


def test_a_student_submitted_before_its_teacher_ends_waits_for_it(
    client: TestClient, dataset: dict[str, Path], service_settings: Settings
) -> None:
    """A pipeline: the distill job names a teacher job still queued. It waits (unpublished,
    no queue place), takes the teacher's architecture from the teacher's spec, and is queued
    and published when the teacher succeeds."""
    teacher = submit(client, job_spec(dataset, name="teacher"))
    spec = job_spec(dataset, name="d", kind="distill", distill={"method": "mimic"})
    spec["teacher"] = {"weights": f"job:{teacher['id']}"}
    student = submit(client, spec)
    assert student["state"] == "waiting" and student["teacher_job_id"] == teacher["id"]
    assert student["queue_position"] is None and student["dispatched"] is False
    teacher_spec = student["spec"]["teacher"]
    assert teacher_spec["backbone"] == teacher["spec"]["student"]["backbone"]
    assert teacher_spec["backbone_norm"] != "auto"
    clash = dict(spec, teacher={"weights": f"job:{teacher['id']}", "fpn_channels": 8})
    r = client.post("/v1/jobs", json=clash)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "teacher.fpn_channels"
    waiting = client.get("/v1/jobs", params={"state": "waiting"}).json()["items"]
    assert [j["id"] for j in waiting] == [student["id"]]

    run_to_end(service_settings, teacher["id"], files={"run/student.pt": b"weights"})
    queued = client.get(f"/v1/jobs/{student['id']}").json()
    assert queued["state"] == "queued" and queued["queue_position"] == 1


def test_what_would_fail_when_the_job_starts_is_a_422_at_submit(
    client: TestClient, dataset: dict[str, Path], service_settings: Settings
) -> None:
    """Checks that depend only on the spec: a teacher resized or normalised unlike the
    student, levels a pyramid lacks or HMKD levels with a gap, an evaluation metric never
    reported. Each answers 422 naming the field, and nothing is queued."""
    teacher = tiny_model(backbone="resnet50", weights="coco")
    cases = [
        (  # torchvision publishes COCO detectors for resnet50 only
            {"teacher": {**teacher, "backbone": "resnet34"}},
            "teacher.weights",
            "resnet50",
        ),
        ({"student": {"image_std": [0.2, 0.0, 0.2]}}, "student.image_std", "may be 0"),
        (
            {"eval": {"extra_area_ranges": {"small": [0, 1024]}}},
            "eval.extra_area_ranges",
            "standard COCO range",
        ),
        (
            {"eval": {"extra_area_ranges": {"x": [1024, 0]}}},
            "eval.extra_area_ranges",
            "0 <= min < max",
        ),
        (  # the two levels coarser than p3-p5 are p6 and p7; Faster R-CNN stops at p6
            {
                "distill": {
                    "method": "hmkd",
                    "levels": ["p3", "p4", "p5"],
                    "hmkd": {"hm": {"query_levels": "deep"}},
                }
            },
            "distill.hmkd.hm.query_levels",
            "'p7'",
        ),
        ({"schedule": {"batch_size": 1000}}, "schedule.batch_size", "fewer than one batch"),
        ({"teacher": {**teacher, "min_size": 48}}, "teacher.min_size", "times 1, 2, 4"),
        ({"teacher": {**teacher, "image_std": [1, 1, 1]}}, "teacher.image_std", "normalise"),
        (
            {"distill": {"method": "hmkd", "levels": ["p2", "p4"]}},
            "distill.levels",
            "consecutive",
        ),
        ({"distill": {"method": "mimic", "levels": ["p7"]}}, "distill.levels", "no level"),
        ({"eval": {"metric": "mAP"}}, "eval.metric", "not reported"),
        (  # p5 is in the pyramid but not distilled: its multiplier would do nothing
            {"distill": {"method": "mimic", "level_weights": {"p5": 2.0}}},
            "distill.level_weights",
            "not distilled",
        ),
        (
            {"distill": {"method": "hmkd", "hmkd": {"hm": {"level_weights": {"p6": 0.5}}}}},
            "distill.hmkd.hm.level_weights",
            "not distilled",
        ),
        (
            {
                "teacher": {**teacher, "arch": "retinanet"},
                "distill": {"levels": ["p3", "p4"], "response": {"weight": 1.0}},
            },
            "distill.response.weight",
            "Faster R-CNN teacher",
        ),
        (  # the teacher's weights are COCO's: its heads know none of the dataset's classes
            {"distill": {"response": {"objectness_weight": 1.0}}},
            "distill.response.objectness_weight",
            "'coco'",
        ),
    ]
    for extra, field, words in cases:
        spec = job_spec(dataset, name="bad", kind="distill", teacher=teacher)
        spec["distill"] = {"method": "mimic"}
        for key, value in extra.items():
            spec[key] = {**spec.get(key, {}), **value}
        r = client.post("/v1/jobs", json=spec)
        assert r.status_code == 422, (field, r.text)
        detail = r.json()["detail"][0]
        assert detail["field"] == field and words in detail["msg"], detail
    ok = job_spec(dataset, eval={"metric": "AP_tiny"})  # an extra area range is reported too
    assert client.post("/v1/jobs", json=ok).status_code == 201
    with session_scope(service_settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1


def test_list_filters_and_three_pages(client: TestClient, dataset: dict[str, Path]) -> None:
    made = []
    for i in range(7):
        queue = "gpu-a100" if i % 2 else "default"
        spec = job_spec(dataset, name=f"Sweep-{i}", resources={"queue": queue})
        made.append(submit(client, spec)["id"])
    client.post(f"/v1/jobs/{made[0]}/cancel").raise_for_status()

    seen, cursor, pages = [], None, 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/jobs", params=params).json()
        pages += 1
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == made[::-1]  # newest first, nothing twice, nothing lost

    def ids(**params: Any) -> set[str]:
        r = client.get("/v1/jobs", params=params)
        assert r.status_code == 200, r.text
        return {j["id"] for j in r.json()["items"]}

    assert ids(state="cancelled") == {made[0]}
    assert ids(state=["cancelled", "queued"]) == set(made)
    assert ids(queue="gpu-a100") == set(made[1::2])
    assert ids(name="sweep-3") == {made[3]}  # case-insensitive "contains"
    assert ids(kind="distill") == set()
    assert ids(method="none") == set(made)
    assert ids(method="hmkd") == set()
    assert client.get("/v1/jobs", params={"method": "distill"}).status_code == 422
    assert client.get("/v1/jobs", params={"limit": 201}).status_code == 422
    bad = client.get("/v1/jobs", params={"cursor": "garbage!"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "cursor"


def test_get_one_job(client: TestClient, dataset: dict[str, Path]) -> None:
    job = submit(client, job_spec(dataset, name="one"))
    r = client.get(f"/v1/jobs/{job['id']}")
    assert r.status_code == 200
    body = r.json()
    assert body["spec"]["name"] == "one" and body["progress"] == 0.0
    assert client.get(f"/v1/jobs/{'f' * 32}").status_code == 404


def test_cancel_queued_then_retry(
    client: TestClient, dataset: dict[str, Path], service_settings: Settings
) -> None:
    job = submit(client, job_spec(dataset))
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409

    r = client.post(f"/v1/jobs/{job['id']}/retry")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "queued" and r.json()["dispatched"] is True
    assert client.post(f"/v1/jobs/{job['id']}/retry").status_code == 409  # queued: not retryable


def test_a_weights_path_that_is_a_folder_is_refused_at_submit(
    client: TestClient, dataset: dict[str, Path]
) -> None:
    spec = job_spec(dataset)
    spec["student"]["weights"] = str(dataset["train_images"])
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["field"] == "student.weights" and "not a file" in error["msg"], error
    assert client.get("/v1/jobs").json()["items"] == []


@pytest.mark.parametrize("key", [b"tab\there", "caf\u00e9".encode("latin-1")])
def test_an_idempotency_key_must_be_printable_ascii(
    client: TestClient, dataset: dict[str, Path], key: bytes
) -> None:
    r = client.post("/v1/jobs", json=job_spec(dataset), headers={"Idempotency-Key": key})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["field"] == "idempotency-key"
    assert client.get("/v1/jobs").json()["items"] == []


def test_logs_tail_and_offset(
    client: TestClient, dataset: dict[str, Path], service_settings: Settings
) -> None:
    job = submit(client, job_spec(dataset))
    assert client.get(f"/v1/jobs/{job['id']}/logs").text == ""  # not started: empty, not 404
    log = Path(service_settings.artifacts_dir or "") / job["id"] / "logs.txt"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {i}\n" for i in range(10)))
    r = client.get(f"/v1/jobs/{job['id']}/logs", params={"tail": 3})
    assert r.text == "line 7\nline 8\nline 9\n"
    assert int(r.headers["x-log-offset"]) == log.stat().st_size
    with log.open("a") as f:
        f.write("line 10\n")
    r = client.get(f"/v1/jobs/{job['id']}/logs", params={"offset": r.headers["x-log-offset"]})
    assert r.text == "line 10\n"
    assert client.get(f"/v1/jobs/{job['id']}/logs").text.count("\n") == 11


def test_metrics_series(
    client: TestClient, dataset: dict[str, Path], service_settings: Settings
) -> None:
    from jobs.lifecycle import claim_job
    from jobs.progress import record_evaluation, record_progress

    job = submit(client, job_spec(dataset))
    with session_scope(service_settings.database_url) as session:
        claim_job(session, job["id"], worker="w#1", lease_seconds=60)
    for it in (1, 2):
        with session_scope(service_settings.database_url) as session:
            record_progress(
                session,
                job["id"],
                worker="w#1",
                attempt=1,
                iteration=it,
                total=4,
                images_per_s=10.0 * it,
                eta_s=4.0 - it,
                lr=0.01,
                losses={"loss_classifier": 1.0 / it, "distill.loss_hm_p2": 0.5},
            )
    with session_scope(service_settings.database_url) as session:
        assert record_evaluation(
            session,
            job["id"],
            worker="w#1",
            attempt=1,
            iteration=2,
            metrics={"AP": 0.1, "AP_S": 0.05},
            metric_name="AP_S",
        )
    series = client.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert series["iteration"] == [1, 2] and series["images_per_s"] == [10.0, 20.0]
    assert series["losses"]["loss_classifier"] == [1.0, 0.5]
    assert series["evaluations"][0]["metrics"]["AP_S"] == 0.05
    got = client.get(f"/v1/jobs/{job['id']}").json()
    assert got["progress"] == 50.0 and got["eta_s"] == 2.0 and got["best_eval"]["AP"] == 0.1


def _events(client: TestClient, job_id: str) -> list[Any]:
    r = client.get(f"/v1/jobs/{job_id}/events")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    return list(parse_sse(iter(r.text.splitlines())))


def test_events_of_a_final_job_end_with_its_state(
    client: TestClient, dataset: dict[str, Path]
) -> None:
    job = submit(client, job_spec(dataset))
    client.post(f"/v1/jobs/{job['id']}/cancel").raise_for_status()
    events = _events(client, job["id"])
    assert [e.event for e in events] == ["state"]
    assert events[0].data["state"] == "cancelled"


def test_events_follow_a_running_job(
    client: TestClient, dataset: dict[str, Path], service_settings: Settings
) -> None:
    """A worker stand-in moves the job along while the stream is open (server polls 50 ms)."""
    from jobs.lifecycle import claim_job, finish_job
    from jobs.models import JobState
    from jobs.progress import record_evaluation, record_progress

    job = submit(client, job_spec(dataset))
    url = service_settings.database_url

    def worker() -> None:
        time.sleep(0.3)
        with session_scope(url) as s:
            claim_job(s, job["id"], worker="w#1", lease_seconds=60)
        time.sleep(0.3)
        with session_scope(url) as s:
            record_progress(
                s, job["id"], worker="w#1", attempt=1, iteration=2, total=4, images_per_s=5.0,
                eta_s=1.0, lr=0.01, losses={"loss": 1.0},
            )  # fmt: skip
        time.sleep(0.3)
        with session_scope(url) as s:
            record_evaluation(
                s,
                job["id"],
                worker="w#1",
                attempt=1,
                iteration=4,
                metrics={"AP": 0.2},
                metric_name="AP",
            )
            finish_job(s, job["id"], worker="w#1", attempt=1, state=JobState.succeeded)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        events = _events(client, job["id"])
    finally:
        thread.join()
    states = [e.data["state"] for e in events if e.event == "state"]
    assert states == ["queued", "running", "succeeded"]
    assert any(e.event == "progress" and e.data["iteration"] == 2 for e in events)
    (evaluation,) = [e for e in events if e.event == "evaluation"]
    assert evaluation.data["metrics"] == {"AP": 0.2}
    assert events[-1].event == "state"


def test_oversized_body_is_413(client: TestClient, service_settings: Settings) -> None:
    big = json.dumps({"name": "x" * (service_settings.max_body_bytes + 1)}).encode()
    r = client.post("/v1/jobs", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "HMKD_MAX_BODY_BYTES" in r.json()["detail"]

    def chunks() -> Any:  # no Content-Length: counted as it streams in
        for _ in range(0, len(big), 65536):
            yield big[:65536]

    r = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_openapi_lists_the_v1_paths(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["info"]["title"] == "HMKD job service"
    assert {t["name"] for t in doc["tags"]} >= {"jobs", "artifacts", "queue", "health"}
    paths = set(doc["paths"])
    for path in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/metrics",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/logs",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/retry",
        "/v1/jobs/{job_id}/artifacts",
        "/v1/jobs/{job_id}/artifacts/{name}",
        "/v1/jobs/{job_id}/artifact-links",
        "/v1/downloads/{link}",
        "/v1/queue",
        "/v1/me",
        "/v1/health",
        "/v1/ready",
    ):
        assert path in paths, path
    assert all(p.startswith("/v1/") for p in paths)


def test_queue_overview(
    client: TestClient, dataset: dict[str, Path], service_settings: Settings
) -> None:
    from jobs.progress import heartbeat_worker

    a = submit(client, job_spec(dataset, name="a"))
    b = submit(client, job_spec(dataset, name="b", resources={"priority": 5}))
    with session_scope(service_settings.database_url) as session:
        heartbeat_worker(
            session,
            name="gpu-box",
            queues=["default"],
            gpus=[{"index": 0, "name": "H100"}],
            current_job_id=None,
        )
    overview = client.get("/v1/queue").json()
    (default,) = overview["queues"]
    assert default["queued"] == 2 and default["running"] == 0
    assert [j["id"] for j in default["jobs"]] == [b["id"], a["id"]]  # priority first
    (worker,) = overview["workers"]
    assert worker["gpus"][0]["name"] == "H100" and worker["heartbeat_age_s"] < 60


def test_health_ready_and_unmigrated_start(
    app: FastAPI, service_settings: Settings, tmp_path: Path
) -> None:
    from api.app import create_app
    from jobs.migrate import DatabaseNotMigrated

    with TestClient(app) as anonymous:
        assert anonymous.get("/v1/health").json()["status"] == "ok"
        ready = anonymous.get("/v1/ready")
        assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text

    empty = service_settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'e.db'}"})
    with pytest.raises(DatabaseNotMigrated, match="hmkd db upgrade"), TestClient(create_app(empty)):
        pass


def test_submit_while_the_broker_is_down_keeps_the_job(
    service_settings: Settings, admin: tuple[Any, str], dataset: dict[str, Path]
) -> None:
    """Nothing listens on port 1: the publish fails fast, the job stays queued and
    undispatched for the workers' sweeper, and the client still gets its 201."""
    from api.app import create_app

    down = service_settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down), headers=bearer(admin[1])) as c:
        started = time.monotonic()
        r = c.post("/v1/jobs", json=job_spec(dataset))
        elapsed = time.monotonic() - started
        assert r.status_code == 201, r.text
        assert r.json()["state"] == "queued" and r.json()["dispatched"] is False
        assert elapsed < 10
        ready = c.get("/v1/ready")
        assert ready.status_code == 503 and ready.json()["broker"].startswith("unreachable")


def _write_coco(path: Path, **changes: Any) -> None:
    coco = json.loads(path.read_text())
    coco.update(changes)
    path.write_text(json.dumps(coco))


@pytest.mark.parametrize(
    ("split", "change", "field", "words"),
    [
        ("train", {"images": [{"id": 1, "file_name": "gone.png", "width": 8, "height": 8},
                              {"id": 2, "file_name": "1.png", "width": 64, "height": 64}]},
         "data.train.images", "not found"),
        ("val", {"categories": [{"id": 1, "name": "letter"}]}, "data.val.annotations",
         "differ from the training split"),
        ("val", {"annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 2, 2]}]},
         "data.val.annotations", "image_id"),
    ],
)  # fmt: skip
def test_images_that_do_not_match_their_annotations_are_refused_at_submit(
    client: TestClient,
    dataset: dict[str, Path],
    split: str,
    change: dict[str, Any],
    field: str,
    words: str,
    service_settings: Settings,
) -> None:
    _write_coco(dataset[f"{split}_annotations"], **change)
    r = client.post("/v1/jobs", json=job_spec(dataset))
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["field"] == field and words in error["msg"], error
    assert _count_jobs(service_settings) == 0


def _loop_file_name(annotations: Path) -> None:
    (annotations.parent / "images" / "loop.png").symlink_to("loop.png")
    coco = json.loads(annotations.read_text())
    coco["images"][0]["file_name"] = "loop.png"
    annotations.write_text(json.dumps(coco))


@pytest.mark.parametrize(
    ("spoil", "field", "words"),
    [
        (lambda p: p.write_bytes(p.read_text().replace("digit", "d\u00efgit").encode("latin-1")),
         "data.train.annotations", "not UTF-8"),
        (lambda p: p.write_text(p.read_text().replace('"id": 1', '"id": 1' + "0" * 5000, 1)),
         "data.train.annotations", "cannot be parsed as JSON"),
        (lambda p: p.write_text(p.read_text().replace('"width": 64', '"width": 1' + "0" * 400)),
         "data.train.annotations", "more pixels than"),
        (_loop_file_name, "data.train.images", "cannot be opened"),
    ],
    ids=["latin-1", "5000-digit-id", "400-digit-width", "file-name-symlink-loop"],
)  # fmt: skip
def test_annotations_that_cannot_be_read_are_refused_at_submit_not_a_500(
    client: TestClient,
    dataset: dict[str, Path],
    spoil: Any,
    field: str,
    words: str,
    service_settings: Settings,
) -> None:
    spoil(dataset["train_annotations"])
    r = client.post("/v1/jobs", json=job_spec(dataset))
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["field"] == field and words in error["msg"], error
    assert _count_jobs(service_settings) == 0


def test_weights_trained_on_other_categories_are_refused_at_submit(
    client: TestClient, dataset: dict[str, Path], service_settings: Settings
) -> None:
    """Labels mean categories: a detector of another number of them cannot load, and where
    labels are compared one by one (an evaluation, the response terms' class scores) the same
    number under other names would score or teach the wrong classes."""
    from hmkd_core.models.export import FORMAT

    def student_file(name: str, categories: list[dict[str, Any]]) -> str:
        return str(export_tiny_student(service_settings.dataset_roots[0] / name, categories))

    digit = {"id": 1, "name": "digit"}  # the dataset's one category
    two = student_file("two.pt", [digit, {"id": 2, "name": "letter"}])
    renamed = student_file("renamed.pt", [{"id": 1, "name": "letter"}])
    same = student_file("same.pt", [digit])
    with_scores = distill_spec(dataset, renamed)
    with_scores["distill"]["response"] = {"weight": 1.0}
    broken = service_settings.dataset_roots[0] / "broken.pt"  # a hand-made header
    torch.save({"format": FORMAT, "categories": [1]}, broken)

    for spec, field in [
        (with_scores, "teacher.weights"),
        (distill_spec(dataset, str(broken)), "teacher.weights"),
        (distill_spec(dataset, two), "teacher.weights"),
        (job_spec(dataset, student=tiny_model(weights=two)), "student.weights"),
        (
            job_spec(dataset, kind="evaluate", student=tiny_model(weights=renamed)),
            "student.weights",
        ),
    ]:
        r = client.post("/v1/jobs", json=spec)
        assert r.status_code == 422, r.text
        (error,) = r.json()["detail"]
        assert error["field"] == field and "categories" in error["msg"], error
    assert _count_jobs(service_settings) == 0
    submit(client, distill_spec(dataset, renamed))  # a teacher's classes need only match in number
    submit(client, job_spec(dataset, kind="evaluate", student=tiny_model(weights=same)))


def test_a_category_without_boxes_is_a_warning_on_the_job(
    client: TestClient, dataset: dict[str, Path]
) -> None:
    both = [{"id": 0, "name": "placeholder"}, {"id": 1, "name": "digit"}]
    for split in ("train", "val"):
        _write_coco(dataset[f"{split}_annotations"], categories=both)
    made = submit(client, job_spec(dataset))
    train, val = made["warnings"]
    assert train.startswith("data.train: category 0 'placeholder' has no boxes")
    assert val.startswith("data.val: category 0 'placeholder' has no boxes")
    assert client.get(f"/v1/jobs/{made['id']}").json()["warnings"] == [train, val]


def test_methods_are_listed_from_the_one_list_the_spec_validates_against(
    client: TestClient, dataset: dict[str, Path]
) -> None:
    from hmkd_core.distill.registry import DISTILLERS
    from hmkd_core.spec import METHODS

    listed = client.get("/v1/methods").json()
    assert [m["name"] for m in listed] == list(METHODS) == list(DISTILLERS)
    assert all(m["summary"] for m in listed)
    r = client.get("/v1/jobs", params={"method": "nosuch"})
    assert r.status_code == 422
    spec = job_spec(dataset, kind="distill", distill={"method": "nosuch"})
    assert client.post("/v1/jobs", json=spec).json()["detail"][0]["field"] == "distill.method"


def test_a_jobs_validation_images_are_served_to_its_team_only(
    client: TestClient, dataset: dict[str, Path], other_team_user: tuple[Any, str]
) -> None:
    (dataset["val_images"] / "0.png").write_bytes(png_bytes(64, 64, 7))
    job = submit(client, job_spec(dataset))
    r = client.get(f"/v1/jobs/{job['id']}/images/1")
    assert r.status_code == 200 and r.content == png_bytes(64, 64, 7)
    assert client.get(f"/v1/jobs/{job['id']}/images/3").status_code == 404
    theirs = client.get(f"/v1/jobs/{job['id']}/images/1", headers=bearer(other_team_user[1]))
    assert theirs.status_code == 404


def test_an_image_that_does_not_open_or_differs_in_size_is_a_422_at_submit(
    client: TestClient, dataset: dict[str, Path], service_settings: Settings
) -> None:
    """Found before, only by the worker once the job ran."""
    (dataset["train_images"] / "0.png").write_bytes(b"GIF89a broken")
    r = client.post("/v1/jobs", json=job_spec(dataset))
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["field"] == "data.train.images" and "cannot be decoded" in error["msg"]
    (dataset["val_images"] / "0.png").write_bytes(png_bytes(32, 64))
    (dataset["train_images"] / "0.png").write_bytes(png_bytes(64, 64))
    r = client.post("/v1/jobs", json=job_spec(dataset))
    (error,) = r.json()["detail"]
    assert error["field"] == "data.val.annotations"
    assert "is 32x64 but the annotation says 64x64" in error["msg"]
    with session_scope(service_settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
