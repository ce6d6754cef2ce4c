"""`GET /v1/jobs/{id}/logs?tail=N`: the last N lines, read backwards in linear time, never more
than the route's 1 MiB cap read or answered, and `X-Log-Truncated` when the cap cut them."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.routes.jobs import LOG_CHUNK_BYTES, _tail
from jobs.settings import Settings
from tests.api.conftest import job_spec, submit


class _Log:
    """A log in memory that reads as `Storage.read` does, counting what it was asked for."""

    def __init__(self, data: bytes, chunk: int = 7) -> None:
        self.data, self.chunk = data, chunk
        self.bytes_read = self.reads = 0

    def read(
        self, job_id: str, name: str, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        assert name == "logs.txt" and start >= 0 and end is not None and end < len(self.data)
        self.reads += 1
        self.bytes_read += end + 1 - start
        for at in range(start, end + 1, self.chunk):
            yield self.data[at : min(at + self.chunk, end + 1)]


def _reference(log: bytes, lines: int, cap: int) -> tuple[bytes, bool]:
    """What `tail` answers, done the plain way over the whole log."""
    found = re.findall(rb"[^\n]*\n|[^\n]+\Z", log)  # a line ends at a newline, or the log
    wanted = b"".join(found[-lines:])
    if len(wanted) <= cap:
        return wanted, False
    starts, at = [], 0
    for line in found:
        starts.append(at)
        at += len(line)
    inside = [s for s in starts if s >= len(log) - cap]  # lines that start in the last `cap`
    return (log[inside[0] :] if inside else log[-cap:]), True


def _tail_of(log: bytes, lines: int, cap: int, block: int) -> tuple[bytes, bool, _Log]:
    storage = _Log(log)
    data, cut = _tail(storage, "j", len(log), lines, cap=cap, block=block)  # type: ignore[arg-type]
    return data, cut, storage


def test_tail_matches_a_plain_reference_on_random_logs() -> None:
    rng = random.Random(20261201)
    for _ in range(3000):
        density = rng.choice([0.0, 0.02, 0.2, 0.5, 0.9])
        size = rng.choice([0, 1, 2, rng.randrange(3, 40), rng.randrange(40, 400)])
        log = bytes(
            ord("\n") if rng.random() < density else rng.choice(b"ab\r") for _ in range(size)
        )
        lines, cap, block = rng.randrange(1, 30), rng.randrange(1, 120), rng.randrange(1, 50)
        data, cut, storage = _tail_of(log, lines, cap, block)
        assert (data, cut) == _reference(log, lines, cap), (log, lines, cap, block)
        assert len(data) <= cap
        assert storage.bytes_read <= min(len(log), cap + 1)  # never past the cap (+ 1 byte)
        assert storage.reads <= -(-(cap + 1) // block)  # each byte read once


def test_a_log_without_newlines_answers_its_last_cap_bytes() -> None:
    log = bytes(range(97, 123)) * 1000  # 26 000 bytes, no newline
    data, cut, storage = _tail_of(log, 1, cap=4096, block=512)
    assert data == log[-4096:] and cut
    assert storage.bytes_read == 4097 and storage.reads == 9
    data, cut, _ = _tail_of(log + b"\n", 1, cap=4096, block=512)  # one line longer than cap
    assert data == (log + b"\n")[-4096:] and cut


def test_many_lines_answer_exactly_the_last_n_reading_only_what_they_need() -> None:
    log = b"".join(b"line %d\n" % i for i in range(10_000))
    data, cut, storage = _tail_of(log, 3, cap=1 << 20, block=64)
    assert data == b"line 9997\nline 9998\nline 9999\n" and not cut
    assert storage.bytes_read <= 64
    data, cut, _ = _tail_of(log + b"partial", 2, cap=1 << 20, block=64)
    assert data == b"line 9999\npartial" and not cut  # a line being written counts as one
    data, cut, _ = _tail_of(log[:50], 1000, cap=1 << 20, block=16)  # more than there are
    assert data == log[:50] and not cut
    data, cut, _ = _tail_of(log, 10_000, cap=1000, block=64)  # the cap cuts: whole lines
    assert cut and len(data) <= 1000 and log.endswith(data) and log[-len(data) - 1] == ord("\n")
    assert data.startswith(b"line 9") and data.endswith(b"line 9999\n")


@pytest.fixture
def log_of(
    client: TestClient, dataset: dict[str, Path], service_settings: Settings
) -> Iterator[tuple[str, Path]]:
    """(job id, its log file), the file not yet written."""
    job = submit(client, job_spec(dataset))
    log = Path(service_settings.artifacts_dir or "") / job["id"] / "logs.txt"
    log.parent.mkdir(parents=True)
    yield job["id"], log


def test_the_route_caps_a_tail_without_newlines_and_says_so(
    client: TestClient, log_of: tuple[str, Path]
) -> None:
    job_id, log = log_of
    text = "".join(chr(97 + i % 26) for i in range(LOG_CHUNK_BYTES + 100_000))  # no newline
    log.write_text(text)
    r = client.get(f"/v1/jobs/{job_id}/logs", params={"tail": 1})
    assert r.status_code == 200
    assert len(r.content) == LOG_CHUNK_BYTES and r.text == text[-LOG_CHUNK_BYTES:]
    assert r.headers["x-log-truncated"] == "true"
    assert int(r.headers["x-log-offset"]) == len(text)
    # the whole log is cut the same way, and says so until the last part
    r = client.get(f"/v1/jobs/{job_id}/logs")
    assert len(r.content) == LOG_CHUNK_BYTES and r.headers["x-log-truncated"] == "true"
    assert int(r.headers["x-log-offset"]) == LOG_CHUNK_BYTES
    r = client.get(f"/v1/jobs/{job_id}/logs", params={"offset": LOG_CHUNK_BYTES})
    assert r.text == text[LOG_CHUNK_BYTES:] and r.headers["x-log-truncated"] == "false"


def test_the_route_answers_the_last_n_lines(client: TestClient, log_of: tuple[str, Path]) -> None:
    job_id, log = log_of
    lines = [f"step {i} loss {i / 7:.4f}\n" for i in range(60_000)]  # ~1.5 MiB
    log.write_text("".join(lines))
    r = client.get(f"/v1/jobs/{job_id}/logs", params={"tail": 25})
    assert r.text == "".join(lines[-25:]) and r.headers["x-log-truncated"] == "false"
    r = client.get(f"/v1/jobs/{job_id}/logs", params={"tail": 100_000})  # more than 1 MiB
    assert r.headers["x-log-truncated"] == "true" and len(r.content) <= LOG_CHUNK_BYTES
    kept = r.text.count("\n")
    assert r.text == "".join(lines[-kept:]) and kept > 40_000  # whole lines, all that fit
    log.write_text("".join(lines[:5]))  # fewer lines than asked: the whole (small) log
    r = client.get(f"/v1/jobs/{job_id}/logs", params={"tail": 100})
    assert r.text == "".join(lines[:5]) and r.headers["x-log-truncated"] == "false"
