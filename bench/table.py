"""The SmallDigits table: one command per preset runs the whole comparison.

    python -m bench.table --preset cpu            # ~2 h on 2 CPU cores; writes docs/results.md
    python -m bench.table --preset gpu            # a lent GPU; writes docs/results-gpu.md

It makes the data, trains the teacher (or takes `--teacher student.pt`), trains the student
with every method and ablation for each seed under the same schedule, measures each
distiller's step cost over the floor, and writes the results page with its plots. Every run
lives in `--work/<preset>/...`; re-running the command skips the runs that finished.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
from pathlib import Path

from bench import report
from bench.presets import PRESETS, ROWS, Preset, student_spec, teacher_spec
from bench.runs import Run, read_run, run_grid
from hmkd_core.data import make_small_digits


def _digits_once(root: Path, settings: dict) -> Path:
    """SmallDigits written under `root` unless it already holds these very settings (the data
    is deterministic for them), so a resumed benchmark does not repaint its images."""
    marker = root / "settings.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == settings):
        make_small_digits(root, **settings)
        marker.write_text(json.dumps(settings))
    return root


def make_data(preset: Preset, root: Path) -> Path:
    """The preset's SmallDigits."""
    return _digits_once(root, preset.data)


def make_tune_data(preset: Preset, root: Path) -> Path:
    """The tuning split: validation images drawn with another seed, never the reported ones."""
    seed = preset.data["seed"] + 1
    return _digits_once(root, {**preset.data, "train": 0, "val": preset.tune_val, "seed": seed})


def teacher_weights(preset: Preset, work: Path, data: Path, given: Path | None) -> Path:
    if given is not None:
        if not given.is_file():
            raise SystemExit(f"--teacher: {given} is not a file")
        return given.resolve()
    run = Run("teacher", teacher_spec(preset, data), work / "teacher")
    failed = run_grid([run], jobs=1, threads=preset.threads)
    if failed:
        raise SystemExit(f"the teacher failed; see {run.out / 'bench.log'}")
    return run.out / "student.pt"


def row_dir(name: str) -> str:
    return name.replace("hmkd: ", "hmkd_").replace(" ", "_")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run the SmallDigits comparison for one preset.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--work", type=Path, default=Path("runs/bench"), help="where runs are kept")
    p.add_argument("--teacher", type=Path, default=None, help="reuse this teacher student.pt")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--rows", nargs="+", default=None, help=f"subset of: {', '.join(ROWS)}")
    p.add_argument("--out", type=Path, default=None, help="results page (default docs/...)")
    p.add_argument("--overhead-rounds", type=int, default=8)
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    seeds = tuple(args.seeds or preset.seeds)
    rows = tuple(args.rows or preset.rows)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {unknown}; choose from {list(ROWS)}")
    work = (args.work / preset.name).resolve()
    started = dt.datetime.now(dt.UTC)

    data = make_data(preset, work / "data")
    teacher = teacher_weights(preset, work, data, args.teacher)
    runs = [
        Run(
            f"{name} seed {seed}",
            student_spec(preset, data, teacher, ROWS[name], seed=seed),
            work / row_dir(name) / f"seed{seed}",
        )
        for name in rows  # a row's seeds run side by side, under the same load
        for seed in seeds
    ]
    failed = run_grid(runs, jobs=preset.jobs, threads=preset.threads)

    teacher_run = read_run(work / "teacher") if args.teacher is None else None
    results = {
        name: {seed: read_run(work / row_dir(name) / f"seed{seed}") for seed in seeds}
        for name in rows
        if all((work / row_dir(name) / f"seed{seed}" / "bench.json").is_file() for seed in seeds)
    }
    overhead = report.measure_overhead(preset, data, rounds=args.overhead_rounds)
    out = args.out or Path("docs/results.md" if preset.name == "cpu" else "docs/results-gpu.md")
    report.write_results(
        out,
        preset=preset,
        seeds=seeds,
        teacher=teacher_run,
        teacher_path=teacher if args.teacher is not None else None,
        rows=results,
        overhead=overhead,
        command=shlex.join(["python", "-m", "bench.table", *(argv or sys.argv[1:])]),
        started=started,
        finished=dt.datetime.now(dt.UTC),
        host=f"{platform.processor() or platform.machine()}, {_cpu_count()} cores",
    )
    print(f"[bench] wrote {out}")
    if failed:
        raise SystemExit(f"runs failed: {failed}")


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
