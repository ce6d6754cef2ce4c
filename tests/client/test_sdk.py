"""The SDK against a real uvicorn server: submit, list, read, follow, cancel, download."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from client.sdk import ApiError, Client, parse_sse
from jobs.db import session_scope
from jobs.settings import Settings
from tests.api.conftest import job_spec, run_to_end

PAYLOAD = os.urandom(3 * (1 << 20) + 123)  # a few chunks, and not a multiple of one


@pytest.fixture
def sdk(live_api: str, admin: tuple[Any, str]) -> Any:
    with Client(live_api, admin[1]) as c:
        yield c


def test_submit_list_get_cancel_retry(sdk: Client, dataset: dict[str, Path]) -> None:
    first = sdk.submit(job_spec(dataset, name="sdk-a"), idempotency_key="once")
    again = sdk.submit(job_spec(dataset, name="sdk-a"), idempotency_key="once")
    assert first["id"] == again["id"] and first["state"] == "queued"
    second = sdk.submit(job_spec(dataset, name="sdk-b"))

    page = sdk.jobs(limit=1)
    assert [j["id"] for j in page["items"]] == [second["id"]] and page["next_cursor"]
    assert [j["id"] for j in sdk.iter_jobs(limit=1)] == [second["id"], first["id"]]
    assert [j["id"] for j in sdk.jobs(name="SDK-A")["items"]] == [first["id"]]
    assert sdk.job(first["id"])["spec"]["name"] == "sdk-a"

    assert sdk.cancel(first["id"])["state"] == "cancelled"
    assert sdk.jobs(state="cancelled")["items"][0]["id"] == first["id"]
    assert sdk.retry(first["id"])["state"] == "queued"
    with pytest.raises(ApiError) as err:
        sdk.retry(first["id"])
    assert err.value.status == 409 and "only failed or cancelled" in str(err.value)


def test_errors_carry_the_servers_message(
    sdk: Client, live_api: str, dataset: dict[str, Path]
) -> None:
    spec = job_spec(dataset)
    spec["data"]["train"]["images"] = "/etc"
    with pytest.raises(ApiError) as err:
        sdk.submit(spec)
    assert err.value.status == 422
    assert str(err.value).startswith("422: data.train.images: ")
    assert "outside the dataset roots" in str(err.value)
    with pytest.raises(ApiError) as err:
        sdk.job("0" * 32)
    assert err.value.status == 404
    with Client(live_api, "hmkd_wrong") as stranger, pytest.raises(ApiError) as err:
        stranger.jobs()
    assert err.value.status == 401
    with Client("http://127.0.0.1:9", "t") as nowhere, pytest.raises(ApiError) as err:
        nowhere.health()
    assert err.value.status == 0 and "cannot reach" in str(err.value)


def test_finds_url_and_token_by_itself(
    live_api: str, admin: tuple[Any, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HMKD_API_URL", live_api)
    monkeypatch.setenv("HMKD_TOKEN", admin[1])
    with Client() as c:
        assert c.jobs()["items"] == []
    monkeypatch.delenv("HMKD_TOKEN")
    monkeypatch.setenv("HMKD_DATA_DIR", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "token").write_text(admin[1] + "\n")
    with Client() as c:
        assert c.health()["status"] == "ok" and c.jobs()["items"] == []


def test_events_stream_live(
    sdk: Client, dataset: dict[str, Path], service_settings: Settings
) -> None:
    from jobs.lifecycle import claim_job, finish_job
    from jobs.models import JobState
    from jobs.progress import record_progress

    job = sdk.submit(job_spec(dataset))
    url = service_settings.database_url

    def worker() -> None:
        time.sleep(0.3)
        with session_scope(url) as s:
            claim_job(s, job["id"], worker="w#1", lease_seconds=60)
        for it in (1, 2, 3):
            time.sleep(0.2)
            with session_scope(url) as s:
                record_progress(
                    s, job["id"], worker="w#1", attempt=1, iteration=it, total=4, images_per_s=3.0,
                    eta_s=1.0, lr=0.01, losses={"loss": 1.0 / it},
                )  # fmt: skip
        with session_scope(url) as s:
            finish_job(s, job["id"], worker="w#1", attempt=1, state=JobState.succeeded)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        events = list(sdk.events(job["id"]))
    finally:
        thread.join()
    assert [e.data["state"] for e in events if e.event == "state"] == [
        "queued",
        "running",
        "succeeded",
    ]
    iterations = [e.data["iteration"] for e in events if e.event == "progress"]
    assert iterations and iterations == sorted(iterations)
    assert events[-1].data["iteration"] == 3  # the final state event carries the last row


def test_parse_sse_handles_multiline_and_comments() -> None:
    lines = [": ping", "event: state", 'data: {"a":', "data: 1}", "id: 7", "", "data: x", ""]
    events = list(parse_sse(iter(lines)))
    assert events[0].event == "state" and events[0].data == {"a": 1} and events[0].id == "7"
    assert events[1].event == "message" and events[1].data == "x"


@pytest.fixture
def finished(sdk: Client, dataset: dict[str, Path], service_settings: Settings) -> str:
    job = sdk.submit(job_spec(dataset))
    run_to_end(service_settings, job["id"], files={"run/student.pt": PAYLOAD})
    return job["id"]


def test_download_verifies_sha256(sdk: Client, finished: str, tmp_path: Path) -> None:
    assert [a["name"] for a in sdk.artifacts(finished)] == ["run/student.pt"]
    path = sdk.download(finished, "run/student.pt", tmp_path)
    assert path == tmp_path / "student.pt" and path.read_bytes() == PAYLOAD
    assert not (tmp_path / "student.pt.part").exists()


def test_download_resumes_a_partial_file(sdk: Client, finished: str, tmp_path: Path) -> None:
    dest = tmp_path / "s.pt"
    half = len(PAYLOAD) // 2
    (tmp_path / "s.pt.part").write_bytes(PAYLOAD[:half])
    seen: list[int] = []
    path = sdk.download(finished, "run/student.pt", dest, progress=lambda d, t: seen.append(d))
    assert path.read_bytes() == PAYLOAD
    assert seen[0] > half and seen[-1] == len(PAYLOAD)  # only the missing half was sent
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(PAYLOAD).hexdigest()


def test_download_restarts_when_the_partial_is_wrong(
    sdk: Client, finished: str, tmp_path: Path
) -> None:
    (tmp_path / "s.pt.part").write_bytes(b"garbage" * 1000)  # not a prefix of the artifact
    assert sdk.download(finished, "run/student.pt", tmp_path / "s.pt").read_bytes() == PAYLOAD
    (tmp_path / "t.pt.part").write_bytes(PAYLOAD + b"more")  # longer than it: 416, restart
    assert sdk.download(finished, "run/student.pt", tmp_path / "t.pt").read_bytes() == PAYLOAD


def test_logs_and_queue(sdk: Client, finished: str, service_settings: Settings) -> None:
    log = Path(service_settings.artifacts_dir or "") / finished / "logs.txt"
    log.write_text("a\nb\nc\n")
    assert sdk.logs(finished) == "a\nb\nc\n"
    assert sdk.logs(finished, tail=1) == "c\n"
    assert sdk.logs_from(finished, 2) == ("b\nc\n", 6)
    assert sdk.queue() == {"queues": [], "workers": [], "team_disk_bytes": len(PAYLOAD)}
    assert sdk.metrics(finished)["iteration"] == []
    assert sdk.delete(finished)["freed_bytes"] == len(PAYLOAD)
    assert sdk.queue()["team_disk_bytes"] == 0


def test_concurrent_retries_with_one_key_make_one_job(
    live_api: str, admin: tuple[Any, str], dataset: dict[str, Path], service_settings: Settings
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import func, select

    from jobs.models import Job

    def submit(i: int) -> str:
        with Client(live_api, admin[1]) as c:
            spec = job_spec(dataset, name=f"k{i % 3}")
            return c.submit(spec, idempotency_key=f"key-{i % 3}")["id"]

    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(submit, range(12)))
    assert len(set(ids)) == 3
    with session_scope(service_settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 3
