"""The benchmark pipeline end to end on the smoke preset: real runs, real evaluation, the page.

The figures of a 2-iteration run mean nothing; what is checked is that every stage ran and fed
the next: the teacher and the base student, two rows over two seeds started from the base,
the records, the summary with its paired intervals, the page and its plot, and that finished
runs are not run again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import table
from bench.presets import Preset
from bench.records import read_record, record_path

pytestmark = pytest.mark.slow


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
            # where it ran: another kind of CPU trains other weights from the same spec
            assert rec["machine"]["torch"] == torch.__version__
            assert rec["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
            assert rec["machine"]["cpu"]
            # warm start: every row starts from the base student, paths kept portable
            assert rec["spec"]["student"]["weights"].startswith("<work>/stages/base-")
            assert rec["inputs"]["init"] == base["inputs"]["student.pt"]
    # a recorded row keeps its weights but not its resumable checkpoints; the stages keep all
    work = tmp_path / "work"
    rows = sorted((work / "rows").glob("*/seed*"))
    assert len(rows) == 4 and all((r / "student.pt").is_file() for r in rows)
    assert not [r for r in rows if (r / "checkpoints").exists()]
    assert all(any((s / "checkpoints").iterdir()) for s in (work / "stages").glob("*-*"))
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
    assert f"run records in `{(results / 'smoke').as_posix()}/`" in text  # not the default
    # records kept outside bench/results make a second table: its plot has a name of its own
    png = out.parent / "results" / "smoke_results_delta_ap_s.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "results/smoke_results_delta_ap_s.png" in text


def test_finished_runs_are_reused_and_the_page_renders_from_records_alone(
    tmp_path: Path, in_repo: None
) -> None:
    argv = _argv(tmp_path, "--rows", "none", "mgd", "--seeds", "0")
    table.main([*argv, "--out", str(tmp_path / "a.md")])
    rec = record_path("smoke", "mgd", 0, tmp_path / "results")
    stages = [record_path("smoke", s, None, tmp_path / "results") for s in ("teacher", "base")]
    stamp = rec.stat().st_mtime_ns
    stage_bytes = [p.read_bytes() for p in stages]
    runs = sorted((tmp_path / "work" / "rows").rglob("bench.json"))
    times = [p.stat().st_mtime_ns for p in runs]
    overhead = tmp_path / "results" / "smoke" / "overhead.json"
    measured = overhead.read_bytes()
    # a row named twice runs once; 0 rounds keep the stored step / floor ratios
    twice = [*argv, "--rows", "none", "mgd", "mgd", "--overhead-rounds", "0"]
    twice += ["--out", str(tmp_path / "b.md")]
    table.main(twice)
    assert overhead.read_bytes() == measured
    assert "| mgd | 1 |" in (tmp_path / "b.md").read_text()
    assert rec.stat().st_mtime_ns == stamp
    assert [p.read_bytes() for p in stages] == stage_bytes  # reused stages: records untouched
    assert [p.stat().st_mtime_ns for p in runs] == times

    # the run folders gone (another machine): --render still builds the page from records
    import shutil

    shutil.rmtree(tmp_path / "work" / "rows")
    (tmp_path / "results" / "smoke" / "diagnose.txt").write_text("p2 teacher rms 1.0\n")
    table.main([*argv, "--render", "--out", str(tmp_path / "c.md")])
    page = (tmp_path / "c.md").read_text()
    assert "| mgd | 1 |" in page and "p2 teacher rms 1.0" in page
    # the records are kept outside the default folder: the page's command says where
    assert f"`python -m bench.diagnose --preset smoke --results {tmp_path / 'results'}`" in page

    # a record made from another base is never paired with this table's runs
    stale = json.loads(rec.read_text())
    stale["inputs"]["init"] = "0" * 64
    rec.write_text(json.dumps(stale))
    table.main([*argv, "--render", "--out", str(tmp_path / "d.md")])
    text = (tmp_path / "d.md").read_text()
    assert "| mgd |" not in text and "Left out: 1 run record(s)" in text and "mgd seed 0" in text
    summary = json.loads((tmp_path / "results" / "smoke" / "summary.json").read_text())
    assert "mgd" not in summary["rows"]


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


def test_a_stage_that_trains_other_weights_keeps_the_recorded_table(
    tmp_path: Path, in_repo: None
) -> None:
    table.main(_argv(tmp_path, "--stages-only"))
    path = record_path("smoke", "teacher", None, tmp_path / "results")
    recorded = json.loads(path.read_text())
    recorded["inputs"]["student.pt"] = "0" * 64  # as if trained on another kind of CPU
    path.write_text(json.dumps(recorded))
    with pytest.raises(SystemExit, match=r"teacher: trained again .* another --results"):
        table.main(_argv(tmp_path, "--rows", "none", "hmkd"))
    assert json.loads(path.read_text()) == recorded  # nothing replaced
    assert not (tmp_path / "results" / "smoke" / "hmkd").exists()  # and no row was run
    # another folder starts a table of its own on the same trained stages
    table.main(_argv(tmp_path, "--stages-only", "--results", str(tmp_path / "again")))
    again = read_record(record_path("smoke", "teacher", None, tmp_path / "again"))
    assert again is not None and again["inputs"]["student.pt"] != "0" * 64


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
    with pytest.raises(SystemExit, match="--jobs: must be at least 1"):
        table.main(_argv(tmp_path, "--jobs", "0"))
    with pytest.raises(SystemExit, match="--overhead-rounds: must be 0 or more"):
        table.main(_argv(tmp_path, "--overhead-rounds", "-1"))


def _extending_smoke(monkeypatch: pytest.MonkeyPatch) -> Preset:
    """The smoke preset with one 2-iteration extension, registered as "smoke", where every
    stage "still gains", so each takes its extension."""
    from dataclasses import replace

    from bench import presets, report

    chunk = {"iterations": 2, "batch_size": 2, "lr": 4e-4, "warmup_iters": 0}
    smoke = replace(presets.SMOKE, extension_schedule=chunk, max_extensions=1)
    monkeypatch.setitem(presets.PRESETS, "smoke", smoke)
    monkeypatch.setattr(report, "PLATEAU_GAIN", -1.0)
    return smoke


def test_a_base_still_gaining_continues_until_its_extensions_run_out(
    tmp_path: Path, in_repo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _extending_smoke(monkeypatch)
    table.main(_argv(tmp_path, "--stages-only"))
    results = tmp_path / "results"
    base = read_record(record_path("smoke", "base", None, results))
    more = read_record(record_path("smoke", "base+1", None, results))
    assert base is not None and more is not None
    assert more["spec"]["student"]["weights"].startswith("<work>/stages/base-")
    assert more["spec"]["schedule"]["iterations"] == 2
    assert read_record(record_path("smoke", "base+2", None, results)) is None  # capped

    # the rows read the last teacher stage, and the page and summary report that one
    last = read_record(record_path("smoke", "teacher+1", None, results))
    assert last is not None
    out = tmp_path / "page.md"
    table.main(_argv(tmp_path, "--rows", "none", "--seeds", "0", "--out", str(out)))
    summary = json.loads((results / "smoke" / "summary.json").read_text())
    assert summary["teacher_ap_s"] == pytest.approx(100 * last["metrics"]["AP_S"])
    assert "; then, still gaining, AP_S" in out.read_text().split("**Teacher**")[1].split("\n")[0]


def test_a_teacher_read_at_twice_the_input_trains_one_chunk_there_and_the_rows_read_it(
    tmp_path: Path, in_repo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from bench import presets

    chunk = {"iterations": 2, "batch_size": 2, "lr": 4e-4, "warmup_iters": 0}
    smoke = replace(presets.SMOKE, teacher_input_size=(128, 128), teacher_resize_schedule=chunk)
    monkeypatch.setitem(presets.PRESETS, "smoke", smoke)
    out = tmp_path / "page.md"
    rows = ("none", "hmkd: light, sixteenth weight, class scores, boxes")
    table.main(_argv(tmp_path, "--rows", *rows, "--seeds", "0", "--jobs", "1", "--out", str(out)))
    results = tmp_path / "results"
    first = read_record(record_path("smoke", "teacher", None, results))
    resized = read_record(record_path("smoke", "teacher+1", None, results))
    assert first is not None and resized is not None
    assert first["spec"]["student"]["min_size"] == 64  # the first chunk at the student's size
    assert resized["spec"]["student"]["min_size"] == resized["spec"]["student"]["max_size"] == 128
    assert resized["spec"]["student"]["weights"].startswith("<work>/stages/teacher-")
    row = read_record(record_path("smoke", rows[1], 0, results))
    assert row is not None and row["inputs"]["teacher"] == resized["inputs"]["student.pt"]
    assert row["spec"]["teacher"]["min_size"] == 128 and row["spec"]["student"]["min_size"] == 64
    assert row["spec"]["teacher"]["weights"].startswith("<work>/stages/teacher1-")
    summary = json.loads((results / "smoke" / "summary.json").read_text())
    assert summary["teacher_ap_s"] == pytest.approx(100 * resized["metrics"]["AP_S"])
    assert summary["rows"][rows[1]]["step_over_floor"] > 0  # the step measure runs beside it
    teacher_line = out.read_text().split("**Teacher**")[1].split("\n")[0]
    assert "; then, at input 128–128 px, AP_S" in teacher_line
    with pytest.raises(ValueError, match="go together"):
        replace(presets.SMOKE, teacher_input_size=(128, 128))


def test_a_teacher_capped_apart_stays_while_the_base_continues_and_presets_share_runs(
    tmp_path: Path, in_repo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from bench import presets

    both = _extending_smoke(monkeypatch)
    monkeypatch.setitem(
        presets.PRESETS, "smoke-base", replace(both, name="smoke-base", teacher_extensions=0)
    )
    argv = _argv(tmp_path, "--rows", "none", "--seeds", "0", "--jobs", "1")
    # `none` reads no teacher: the stages are trained first, the teacher among them
    table.main(_argv(tmp_path, "--stages-only", "--jobs", "1"))
    table.main([*argv, "--out", str(tmp_path / "both.md")])
    runs = sorted((tmp_path / "work" / "rows").rglob("bench.json"))
    times = [p.stat().st_mtime_ns for p in runs]

    table.main(_argv(tmp_path, "--stages-only", "--jobs", "1", "--preset", "smoke-base"))
    table.main([*argv, "--preset", "smoke-base", "--out", str(tmp_path / "base.md")])
    results = tmp_path / "results"
    assert read_record(record_path("smoke", "teacher+1", None, results)) is not None
    assert read_record(record_path("smoke-base", "teacher+1", None, results)) is None
    extended = read_record(record_path("smoke", "base+1", None, results))
    again = read_record(record_path("smoke-base", "base+1", None, results))
    assert extended is not None and again is not None
    assert again["inputs"] == extended["inputs"] and again["spec"] == extended["spec"]
    # `none` never reads the teacher: the second preset records the first's run, not a new one
    none = read_record(record_path("smoke-base", "none", 0, results))
    assert none is not None and none["inputs"]["init"] == extended["inputs"]["student.pt"]
    assert sorted((tmp_path / "work" / "rows").rglob("bench.json")) == runs
    assert [p.stat().st_mtime_ns for p in runs] == times


def test_random_teacher_rows_need_no_trained_teacher_and_outlive_a_retrained_one(
    tmp_path: Path, in_repo: None
) -> None:
    from bench.records import file_sha256

    argv = _argv(tmp_path, "--jobs", "1")
    controls = ["--rows", "none", "mimic: random teacher"]
    table.main([*argv, *controls, "--out", str(tmp_path / "controls.md")])
    results = tmp_path / "results"
    # no row read a trained teacher, so none was trained: the controls ran at once
    assert read_record(record_path("smoke", "teacher", None, results)) is None
    assert not list((tmp_path / "work" / "stages").glob("teacher*"))
    for seed in (0, 1):
        rec = read_record(record_path("smoke", "mimic: random teacher", seed, results))
        assert rec is not None
        draw = rec["spec"]["teacher"]["weights"]
        assert draw.startswith("<work>/controls/random-teacher-")
        assert draw.endswith(f"-seed{seed}.pt")
        assert "teacher" not in rec["inputs"]  # no stage of the table
        path = tmp_path / "work" / draw.removeprefix("<work>/")
        assert rec["inputs"]["random_teacher"] == file_sha256(path)
    control = record_path("smoke", "mimic: random teacher", 0, results)
    stamp = control.stat().st_mtime_ns

    # diagnosing the control alone needs no trained teacher either: it reads seed 0's draw
    from bench import diagnose

    out = tmp_path / "diagnose.txt"
    where = ["--work", str(tmp_path / "work"), "--results", str(results)]
    diagnose.main(["--preset", "smoke", "--rows", "mimic: random teacher", *where,
                   "--batches", "1", "--out", str(out)])  # fmt: skip
    assert out.read_text().startswith("mimic: random teacher: ")
    assert not list((tmp_path / "work" / "stages").glob("teacher*"))

    # the method's own row trains the teacher; the finished controls are not run again
    page = tmp_path / "page.md"
    table.main([*argv, "--rows", "none", "mimic", "mimic: random teacher", "--out", str(page)])
    assert control.stat().st_mtime_ns == stamp
    summary = json.loads((results / "smoke" / "summary.json").read_text())
    row = summary["rows"]["mimic: random teacher"]
    assert row["seeds"] == 2 and row["against_method"]["method"] == "mimic"
    assert row["step_over_floor"] == summary["rows"]["mimic"]["step_over_floor"]  # its step
    assert summary["teachers"] == 1  # the draws are not counted among the table's teachers
    text = page.read_text()
    assert "every row reads but the random-teacher controls" in text
    assert "- `mimic: random teacher`: `" in text and "from a random teacher" in text

    # a teacher retrained elsewhere leaves `mimic` unpaired, but not the controls
    teacher = record_path("smoke", "teacher", None, results)
    retrained = json.loads(teacher.read_text())
    retrained["inputs"]["student.pt"] = "0" * 64
    teacher.write_text(json.dumps(retrained))
    rows = ["--rows", "none", "mimic", "mimic: random teacher"]
    table.main([*argv, *rows, "--render", "--out", str(tmp_path / "after.md")])
    summary = json.loads((results / "smoke" / "summary.json").read_text())
    assert "mimic" not in summary["rows"] and summary["rows"]["mimic: random teacher"]["seeds"] == 2
