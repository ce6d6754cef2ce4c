"""How long a preset's table would take on this machine, from short runs of each stage.

A table is hours of training; whether it fits a machine's time is worth knowing before it
starts. This trains each stage (the teacher, the base student, a student under each row) for a
few iterations at the preset's sizes, through the same `train` the table uses, reads the
seconds per iteration from the runs' own progress records (the first window, with its warm-up,
left out), times one evaluation of the validation split, and projects the whole table:

    python -m bench.throughput --preset hituav-gpu --data-root /data/hituav --iterations 60

The short runs' teacher is untrained; a trained one costs the same per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.data import prepare
from bench.presets import (
    PRESETS,
    Preset,
    base_student_spec,
    row_distill,
    student_spec,
    teacher_resize_spec,
    teacher_spec,
    with_data_root,
)
from hmkd_core.engine.evaluate import evaluate_spec
from hmkd_core.engine.run import train
from hmkd_core.spec import TrainSpec


def seconds_per_iteration(run_dir: Path, batch_size: int) -> float:
    """Median seconds per iteration over a run's progress windows after the first."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r]
    if len(rates) < 2:
        raise SystemExit(f"{run_dir}: too few progress records; raise --iterations")
    return statistics.median(batch_size / r for r in rates[1:])


def _short(spec: dict[str, Any], iterations: int) -> TrainSpec:
    spec = {**spec, "schedule": {**spec["schedule"], "iterations": iterations}}
    spec["schedule"]["warmup_iters"] = min(spec["schedule"].get("warmup_iters", 0), iterations)
    spec["eval"] = {"every": 0}
    return TrainSpec.model_validate(spec)


def _timed_run(spec: TrainSpec, out: Path) -> float:
    result = train(spec, out)
    if result.status != "succeeded":
        raise SystemExit(f"{out}: the short run ended {result.status}")
    return seconds_per_iteration(out, spec.schedule.batch_size)


def _eval_seconds(spec: TrainSpec, weights: Path, out: Path) -> float:
    """Seconds of one evaluation of `spec`'s validation split with `weights`, as a stage's."""
    scored = spec.model_copy(
        update={"student": spec.student.model_copy(update={"weights": str(weights)})}
    )
    t0 = time.perf_counter()
    evaluate_spec(scored, out)
    return time.perf_counter() - t0


def measure(preset: Preset, work: Path, *, iterations: int, rows: tuple[str, ...]) -> dict:
    """Seconds per iteration of each stage and row, one evaluation's seconds, and the table's
    projected hours at the preset's schedules, seeds and concurrency."""
    splits = prepare(preset, work / "data")
    teacher = _short(teacher_spec(preset, splits), iterations)
    per_it = {"teacher": _timed_run(teacher, work / "teacher")}
    teacher_pt = work / "teacher" / "student.pt"
    if preset.base_schedule is not None:
        per_it["base"] = _timed_run(
            _short(base_student_spec(preset, splits), iterations), work / "base"
        )
    evaluations: dict[str, float] = {}  # the stages evaluated at another input than the first
    if preset.teacher_resize_schedule is not None:  # its last chunk, at the larger input
        resized = _short(teacher_resize_spec(preset, splits, teacher_pt), iterations)
        per_it["teacher_resized"] = _timed_run(resized, work / "teacher_resized")
        at_size = _eval_seconds(resized, teacher_pt, work / "evaluation_resized")
        evaluations["teacher_resized"] = at_size
    for row in rows:
        distill = row_distill(preset, row)
        weights = None if distill["method"] == "none" else teacher_pt  # a control's: same cost
        spec = student_spec(preset, splits, weights, distill, seed=0)
        per_it[row] = _timed_run(_short(spec, iterations), work / "rows" / row.replace(" ", "_"))
    evaluation = _eval_seconds(teacher, teacher_pt, work / "evaluation")

    def stage_s(
        stage: str, schedule: dict[str, Any], evals: int, evaluation: float = evaluation
    ) -> float:
        return per_it[stage] * schedule["iterations"] + evals * evaluation

    def evals(schedule: dict[str, Any], every: int) -> int:
        return 1 + (schedule["iterations"] - 1) // every if every else 1

    stages = stage_s(
        "teacher", preset.teacher_schedule, evals(preset.teacher_schedule, preset.stage_eval_every)
    )
    if preset.base_schedule is not None:
        stages += stage_s(
            "base", preset.base_schedule, evals(preset.base_schedule, preset.stage_eval_every)
        )
    if preset.teacher_resize_schedule is not None:  # evaluated at its own, larger input
        resize = preset.teacher_resize_schedule
        every = evals(resize, preset.stage_eval_every)
        stages += stage_s("teacher_resized", resize, every, evaluations["teacher_resized"])
    row_evals = evals(preset.student_schedule, preset.eval_every)
    runs = sum(stage_s(r, preset.student_schedule, row_evals) for r in rows) * len(preset.seeds)
    return {
        "preset": preset.name,
        "iterations": iterations,
        "device": torch.cuda.get_device_name() if preset.device == "cuda" else "cpu",
        "seconds_per_iteration": per_it,
        "evaluation_s": evaluation,
        "stage_evaluation_s": evaluations,
        "projected_h": {
            "stages": stages / 3600,
            "rows": runs / preset.jobs / 3600,
            "table": (stages + runs / preset.jobs) / 3600,
        },
        "seeds": len(preset.seeds),
        "jobs": preset.jobs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--iterations", type=int, default=60, help="per short run (10 per record)")
    p.add_argument("--rows", nargs="+", default=None, help="default: the preset's rows")
    p.add_argument("--data-root", type=Path, default=None, help="a COCO preset's data set here")
    p.add_argument("--work", type=Path, default=Path("runs/throughput"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.iterations < 20:
        p.error(f"--iterations: at least 20 (two progress windows of 10), got {args.iterations}")
    preset = PRESETS[args.preset]
    if args.data_root:
        preset = with_data_root(preset, args.data_root)
    rows = tuple(args.rows or preset.rows)
    result = measure(preset, args.work / preset.name, iterations=args.iterations, rows=rows)
    print(f"{preset.name} on {result['device']}, {args.iterations} iterations per stage")
    print(f"{'stage':<34}{'s/it':>8}")
    for stage, seconds in result["seconds_per_iteration"].items():
        print(f"{stage:<34}{seconds:>8.3f}")
    print(f"{'evaluation (val split)':<34}{result['evaluation_s']:>8.1f} s")
    hours = result["projected_h"]
    print(
        f"projected: stages {hours['stages']:.2f} h, rows {hours['rows']:.2f} h "
        f"({len(rows)} rows x {result['seeds']} seeds, {result['jobs']} at a time), "
        f"table {hours['table']:.2f} h"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
