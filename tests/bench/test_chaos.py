"""A short chaos run against the real PostgreSQL and Redis: each kind of fault once, and the
checks that nothing was lost, ran twice or was written by a stale attempt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import chaos

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


def test_a_short_chaos_run_loses_nothing(tmp_path: Path) -> None:
    db = os.environ.get("HMKD_TEST_DATABASE_URL")
    broker = os.environ.get("HMKD_TEST_BROKER_URL")
    if not db or not broker:
        pytest.skip("needs HMKD_TEST_DATABASE_URL and HMKD_TEST_BROKER_URL")
    hostport = broker.split("://", 1)[1].split("/", 1)[0]
    out, report = tmp_path / "reliability.md", tmp_path / "report.json"
    code = chaos.main(
        [
            "--database-url", db,
            "--redis", hostport,
            "--jobs", "2",
            "--workers", "2",
            "--faults", str(len(chaos.FAULTS)),
            "--iterations", "30",
            "--gap", "1", "3",
            "--max-minutes", "6",
            "--out", str(out),
            "--json", str(report),
        ]
    )  # fmt: skip
    result = json.loads(report.read_text())
    assert code == 0, result
    assert result["faults"] == len(chaos.FAULTS)
    assert set(result["faults_by_kind"]) == set(chaos.FAULTS)
    assert result["jobs_lost"] == 0 and result["jobs_run_twice"] == 0
    assert result["attempts"]["total"] > result["jobs"]  # the faults did hit running jobs
    assert "Verdict: **passed**" in out.read_text()


def test_the_verdict_fails_on_any_must_be_zero_line() -> None:
    good = {
        "jobs_not_terminal": 0,
        "jobs_lost": 0,
        "jobs_run_twice": 0,
        "writes_after_a_newer_claim": 0,
        "students_bad": [],
        "duplicate_jobs_from_resubmits": 0,
    }
    assert chaos.passed(good)
    for key, bad in [(k, ["x"] if k == "students_bad" else 1) for k in good]:
        assert not chaos.passed({**good, key: bad}), key
