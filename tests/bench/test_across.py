"""Pairing a row of one table with a row of another that started from the same student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import across
from bench.records import record_path

LEFT, RIGHT = "hituav-cpu-extended", "hituav-cpu-extended-base"


def _write(results: Path, preset: str, seed: int, ap_s: float, init: str = "a" * 64) -> None:
    path = record_path(preset, "hmkd", seed, results)
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {"AP_S": ap_s, "AP": ap_s / 2, "AP50": -1.0}  # -1: COCO's "not measured"
    record = {"metrics": metrics, "tune_metrics": None, "inputs": {"init": init}}
    path.write_text(json.dumps(record))


def test_the_difference_is_paired_seed_by_seed_and_says_when_it_is_noise(tmp_path: Path) -> None:
    for seed in range(5):
        # the seeds spread 4 points; the left row is 1 point above the right on every seed,
        # give or take 0.1: a paired interval finds it, unpaired means would not
        _write(tmp_path, LEFT, seed, 0.11 + seed / 100 + (seed % 2) / 1000)
        _write(tmp_path, RIGHT, seed, 0.10 + seed / 100)
    text = across.render(f"{LEFT}:hmkd", f"{RIGHT}:hmkd", tmp_path)
    ap_s = next(line for line in text.splitlines() if line.startswith("| AP_S | val |"))
    cells = [c.strip() for c in ap_s.strip("|").split("|")]
    assert cells[2] == "+1.04" and cells[4] == "higher"
    lo, hi = (float(x) for x in cells[3].strip("[]").split(","))
    assert 0.9 < lo < 1.04 < hi < 1.2
    assert "| AP | val | +0.52 |" in text
    assert "AP50" not in text and "tuning" not in text  # nothing measured there: no row
    assert "seeds 0, 1, 2, 3, 4" in text

    out = tmp_path / "page" / "across.md"
    across.main([f"{LEFT}:hmkd", f"{RIGHT}:hmkd", "--results", str(tmp_path), "--out", str(out)])
    assert out.read_text() == text


def test_runs_from_other_students_or_unknown_rows_are_refused(tmp_path: Path) -> None:
    for seed in range(2):
        _write(tmp_path, LEFT, seed, 0.12)
        _write(tmp_path, RIGHT, seed, 0.10, init="b" * 64 if seed == 1 else "a" * 64)
    with pytest.raises(SystemExit, match=r"seed 1: .* not the same student"):
        across.render(f"{LEFT}:hmkd", f"{RIGHT}:hmkd", tmp_path)
    with pytest.raises(SystemExit, match="expected PRESET:ROW"):
        across.render(f"{LEFT}:nonsense", f"{RIGHT}:hmkd", tmp_path)
    with pytest.raises(SystemExit, match=r"cpu:mgd: no finished run"):
        across.render("cpu:mgd", f"{RIGHT}:hmkd", tmp_path)
