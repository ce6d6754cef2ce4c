"""The benchmark pipeline end to end on the smoke preset: real runs, real evaluation, the page.

The figures of a 2-iteration run mean nothing; what is checked is that every stage ran and fed
the next: the teacher and the base student, two rows over two seeds started from the base,
the records, the summary with its paired intervals, the page and its plot, and that finished
runs are not run again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import table
from bench.records import read_record, record_path

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    # the runs are `python -m bench.run_one` processes: they import `bench` from the repo root
    monkeypatch.chdir(REPO)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--preset", "smoke",
        "--work", str(tmp_path / "work"),
        "--results", str(tmp_path / "results"),
        "--overhead-rounds", "1",
        *extra,
    ]  # fmt: skip


def test_smoke_table_records_every_run_and_writes_summary_and_page(
    tmp_path: Path, in_repo: None
) -> None:
    out = tmp_path / "docs" / "results.md"
    table.main(_argv(tmp_path, "--rows", "none", "hmkd", "--out", str(out)))
    results = tmp_path / "results"

    teacher = read_record(record_path("smoke", "teacher", None, results))
    base = read_record(record_path("smoke", "base", None, results))
    assert teacher is not None and base is not None
    for row in ("none", "hmkd"):
        for seed in (0, 1):
            rec = read_record(record_path("smoke", row, seed, results))
            assert rec is not None, (row, seed)
            assert rec["seed"] == seed and rec["metrics"]["iteration"] == 2
            assert rec["tune_metrics"] is not None and "AP_S" in rec["tune_metrics"]
            assert rec["cost"]["peak_rss_mib"] > 100  # a process that imported torch
            # warm start: every row starts from the base student, paths kept portable
            assert rec["spec"]["student"]["weights"].startswith("<work>/stages/base-")
            assert rec["inputs"]["init"] == base["inputs"]["student.pt"]
    hmkd = read_record(record_path("smoke", "hmkd", 1, results))
    assert hmkd["spec"]["teacher"]["weights"].startswith("<work>/stages/teacher-")
    assert hmkd["inputs"]["teacher"] == teacher["inputs"]["student.pt"]
    assert hmkd["spec"]["runtime"]["seed"] == 1

    summary = json.loads((results / "smoke" / "summary.json").read_text())
    assert summary["preset"] == "smoke" and summary["protocol"] == "warm"
    row = summary["rows"]["hmkd"]
    assert row["seeds"] == 2 and len(row["ci95"]) == 2
    assert row["ci95"][0] <= row["delta_ap_s"] <= row["ci95"][1]
    assert row["step_over_floor"] > 0  # measured (its size depends on the machine's load)
    assert summary["rows"]["none"]["delta_ap_s"] == 0.0
    from bench.headline import headline

    assert "hmkd" in headline(summary) and "over 2 seeds" in headline(summary)

    text = out.read_text()
    assert "python -m bench.table --preset smoke" in text
    assert "**Seeds**: 0, 1" in text
    assert "Goal " in text and "| hmkd | 2 |" in text
    png = out.parent / "results" / "smoke_delta_ap_s.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "results/smoke_delta_ap_s.png" in text


def test_finished_runs_are_reused_and_the_page_renders_from_records_alone(
    tmp_path: Path, in_repo: None
) -> None:
    argv = _argv(tmp_path, "--rows", "none", "mgd", "--seeds", "0")
    table.main([*argv, "--out", str(tmp_path / "a.md")])
    rec = record_path("smoke", "mgd", 0, tmp_path / "results")
    stamp = rec.stat().st_mtime_ns
    runs = sorted((tmp_path / "work" / "smoke").rglob("bench.json"))
    times = [p.stat().st_mtime_ns for p in runs]
    table.main([*argv, "--out", str(tmp_path / "b.md")])
    assert rec.stat().st_mtime_ns == stamp
    assert [p.stat().st_mtime_ns for p in runs] == times

    # the run folders gone (another machine): --render still builds the page from records
    import shutil

    shutil.rmtree(tmp_path / "work" / "smoke")
    table.main([*argv, "--render", "--out", str(tmp_path / "c.md")])
    assert "| mgd | 1 |" in (tmp_path / "c.md").read_text()


def test_a_record_made_from_other_weights_runs_again(tmp_path: Path, in_repo: None) -> None:
    # a teacher retrained elsewhere has another sha256: runs against the old one are unpaired
    argv = _argv(tmp_path, "--rows", "none", "mgd", "--seeds", "0", "--out", str(tmp_path / "a.md"))
    table.main(argv)
    results = tmp_path / "results"
    mgd, none = (record_path("smoke", row, 0, results) for row in ("mgd", "none"))
    stale = json.loads(mgd.read_text())
    stale["inputs"]["teacher"] = "0" * 64
    mgd.write_text(json.dumps(stale))
    kept = none.stat().st_mtime_ns
    table.main(argv)
    assert json.loads(mgd.read_text())["inputs"]["teacher"] != "0" * 64
    assert none.stat().st_mtime_ns == kept  # `none` never read the teacher


def test_the_citation_is_not_part_of_the_data_key(tmp_path: Path) -> None:
    from dataclasses import replace

    from bench import presets

    reworded = {**presets.HITUAV_CPU.data, "cite": "another wording"}
    assert table.data_root(replace(presets.HITUAV_CPU, data=reworded), tmp_path) == (
        table.data_root(presets.HITUAV_CPU, tmp_path)
    )
    fewer = {**presets.HITUAV_CPU.data, "tune": 100}
    assert table.data_root(replace(presets.HITUAV_CPU, data=fewer), tmp_path) != (
        table.data_root(presets.HITUAV_CPU, tmp_path)
    )


def test_bad_arguments_are_named(tmp_path: Path, in_repo: None) -> None:
    with pytest.raises(SystemExit, match=r"--teacher: .*missing\.pt is not a file"):
        table.main(_argv(tmp_path, "--teacher", str(tmp_path / "missing.pt")))
    with pytest.raises(SystemExit, match="unknown row"):
        table.main(_argv(tmp_path, "--rows", "nonsense"))
    with pytest.raises(SystemExit, match="needs the 'none' row"):
        table.main(_argv(tmp_path, "--rows", "hmkd"))


def test_a_base_still_gaining_continues_until_its_extensions_run_out(
    tmp_path: Path, in_repo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from bench import presets, report

    chunk = {"iterations": 2, "batch_size": 2, "lr": 4e-4, "warmup_iters": 0}
    smoke = replace(presets.SMOKE, extension_schedule=chunk, max_extensions=1)
    monkeypatch.setitem(presets.PRESETS, "smoke", smoke)
    monkeypatch.setattr(report, "PLATEAU_GAIN", -1.0)  # every run "still gains"
    table.main(_argv(tmp_path, "--stages-only"))
    results = tmp_path / "results"
    base = read_record(record_path("smoke", "base", None, results))
    more = read_record(record_path("smoke", "base+1", None, results))
    assert base is not None and more is not None
    assert more["spec"]["student"]["weights"].startswith("<work>/stages/base-")
    assert more["spec"]["schedule"]["iterations"] == 2
    assert read_record(record_path("smoke", "base+2", None, results)) is None  # capped
