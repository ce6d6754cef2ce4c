"""The benchmark pipeline end to end on the smoke preset: real runs, real evaluation, the page.

The figures of a 2-iteration run mean nothing; what is checked is that every stage ran and fed
the next: the teacher, two rows over two seeds, the overhead ratios, the page and its plots.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import table
from bench.runs import read_run

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    # the runs are `python -m bench.run_one` processes: they import `bench` from the repo root
    monkeypatch.chdir(REPO)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )


def test_smoke_table_writes_every_row_seed_and_plot(tmp_path: Path, in_repo: None) -> None:
    out = tmp_path / "docs" / "results.md"
    work = tmp_path / "work"
    argv = ["--preset", "smoke", "--work", str(work), "--rows", "none", "hmkd"]
    table.main([*argv, "--out", str(out), "--overhead-rounds", "1"])

    text = out.read_text()
    assert "python -m bench.table --preset smoke" in text
    assert "**Seeds**: 0, 1" in text
    rows: dict[str, str] = {}
    for line in text.splitlines():  # the first table; the Δ table repeats the row names
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert {"teacher", "none", "hmkd"} <= set(rows)
    # a student cell is "mean (seed0 / seed1)"; the teacher's is a single value
    assert rows["hmkd"].count(" / ") >= 8
    assert " / " not in rows["teacher"].split("|")[2]
    # hmkd has a step/floor ratio, the baseline none
    assert rows["hmkd"].rstrip(" |").split("|")[-1].strip()[0].isdigit()
    assert rows["none"].rstrip(" |").split("|")[-1].strip() == "–"
    for plot in ("smoke_ap_s.png", "smoke_curves.png"):
        png = out.parent / "results" / plot
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"results/{plot}" in text

    run = read_run(work / "smoke" / "hmkd" / "seed1")
    assert run["metrics"]["iteration"] == 2
    assert run["peak_rss_mib"] > 100  # a process that imported torch and trained
    spec = json.loads((work / "smoke" / "hmkd" / "seed1" / "bench_spec.json").read_text())
    assert spec["runtime"]["seed"] == 1
    assert spec["distill"]["method"] == "hmkd"
    assert spec["teacher"]["weights"] == str(work / "smoke" / "teacher" / "student.pt")


def test_finished_runs_are_reused_and_a_missing_teacher_is_named(
    tmp_path: Path, in_repo: None
) -> None:
    work = tmp_path / "work"
    argv = ["--preset", "smoke", "--work", str(work), "--rows", "none", "--seeds", "0"]
    table.main([*argv, "--out", str(tmp_path / "a.md"), "--overhead-rounds", "1"])
    stamp = (work / "smoke" / "none" / "seed0" / "bench.json").stat().st_mtime_ns
    teacher = (work / "smoke" / "teacher" / "bench.json").stat().st_mtime_ns
    table.main([*argv, "--out", str(tmp_path / "b.md"), "--overhead-rounds", "1"])
    assert (work / "smoke" / "none" / "seed0" / "bench.json").stat().st_mtime_ns == stamp
    assert (work / "smoke" / "teacher" / "bench.json").stat().st_mtime_ns == teacher

    with pytest.raises(SystemExit, match=r"--teacher: .*missing\.pt is not a file"):
        table.main([*argv, "--teacher", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit, match="unknown row"):
        table.main([*argv, "--rows", "nonsense"])
