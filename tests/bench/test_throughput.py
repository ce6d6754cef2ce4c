"""Sizing a table from short runs (`bench.throughput`) and pointing a COCO preset at a copy of
its data set (`with_data_root`, used by `bench.throughput` and `bench.overhead` on a machine
where the data lies elsewhere)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench import overhead, throughput
from bench.data import prepare
from bench.presets import PRESETS, with_data_root
from hmkd_core.data import make_small_digits


def test_seconds_per_iteration_leaves_out_the_warm_up_window(tmp_path: Path) -> None:
    records = [
        {"iteration": 10, "images_per_s": 0.5},  # first window: start-up, not the pace
        {"iteration": 20, "images_per_s": 4.0},
        {"iteration": 20, "eval": {"AP": 0.1}},  # evaluations carry no pace
        {"iteration": 30, "images_per_s": 2.0},
        {"iteration": 40, "images_per_s": 4.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert throughput.seconds_per_iteration(tmp_path, batch_size=2) == pytest.approx(0.5)


def test_seconds_per_iteration_needs_two_windows(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"images_per_s": 3.0}))
    with pytest.raises(SystemExit, match="too few progress records"):
        throughput.seconds_per_iteration(tmp_path, batch_size=2)


@pytest.mark.slow
def test_throughput_times_every_stage_and_projects_the_table(tmp_path: Path) -> None:
    preset = PRESETS["smoke"]
    result = throughput.measure(preset, tmp_path, iterations=20, rows=("none", "hmkd"))
    per_it = result["seconds_per_iteration"]
    assert set(per_it) == {"teacher", "base", "none", "hmkd"}
    assert all(v > 0 for v in per_it.values()) and result["evaluation_s"] > 0
    for stage in ("teacher", "base", "rows/none", "rows/hmkd"):  # each a real 20-iteration run
        done = json.loads((tmp_path / stage / "result.json").read_text())
        assert done["status"] == "succeeded" and done["iteration"] == 20, stage
    hours = result["projected_h"]
    # smoke: 2-iteration stages and rows, one evaluation each, two seeds, two runs at a time
    evaluation = result["evaluation_s"]
    stages = 2 * per_it["teacher"] + 2 * per_it["base"] + 2 * evaluation
    rows = 2 * sum(2 * per_it[r] + evaluation for r in ("none", "hmkd")) / 2
    assert hours["stages"] * 3600 == pytest.approx(stages)
    assert hours["rows"] * 3600 == pytest.approx(rows)
    assert hours["table"] == pytest.approx(hours["stages"] + hours["rows"])


@pytest.mark.slow
def test_throughput_counts_the_chunk_that_trains_the_teacher_at_a_larger_input(
    tmp_path: Path,
) -> None:
    chunk = {"iterations": 3, "batch_size": 2, "lr": 4e-4, "warmup_iters": 0}
    preset = replace(PRESETS["smoke"], teacher_input_size=(128, 128), teacher_resize_schedule=chunk)
    result = throughput.measure(preset, tmp_path, iterations=20, rows=("none",))
    per_it = result["seconds_per_iteration"]
    assert set(per_it) == {"teacher", "base", "teacher_resized", "none"}
    done = json.loads((tmp_path / "teacher_resized" / "result.json").read_text())
    assert done["status"] == "succeeded" and done["iteration"] == 20
    at_size = result["stage_evaluation_s"]["teacher_resized"]
    evaluation = result["evaluation_s"]
    stages = 2 * per_it["teacher"] + 2 * per_it["base"] + 2 * evaluation
    stages += 3 * per_it["teacher_resized"] + at_size
    assert result["projected_h"]["stages"] * 3600 == pytest.approx(stages)


def test_a_coco_preset_reads_its_data_from_another_root(tmp_path: Path) -> None:
    made = make_small_digits(tmp_path / "made", train=6, val=2, size=64, seed=0)
    root = tmp_path / "copy"
    for split in ("train", "val"):
        shutil.copytree(made[f"{split}_images"], root / split / "images")
        shutil.copy(made[f"{split}_annotations"], root / split / "annotations.json")
    preset = replace(PRESETS["hituav-cpu"], data={**PRESETS["hituav-cpu"].data, "tune": 2})
    splits = prepare(with_data_root(preset, root), tmp_path / "splits")
    assert splits.train[0] == splits.tune[0] == (root / "train" / "images").resolve()
    assert splits.val == (
        (root / "val" / "images").resolve(),
        (root / "val/annotations.json").resolve(),
    )
    kept = json.loads(splits.train[1].read_text())
    assert len(kept["images"]) == 4  # six, less the two held out for tuning
    with pytest.raises(ValueError, match="makes its own data"):
        with_data_root(PRESETS["cpu"], root)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_overhead_of_a_cuda_preset_says_no_gpu_is_visible() -> None:
    with pytest.raises(SystemExit, match="no CUDA device is visible"):
        overhead.measure(overhead.preset_spec("hituav-gpu"), rounds=1, batch_size=1)
