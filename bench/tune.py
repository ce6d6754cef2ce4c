"""Tune HMKD's defaults on a split the results page never reports.

    python -m bench.tune --preset cpu [--teacher runs/bench/cpu/teacher/student.pt]

Every variant is a student run of the preset's schedule, evaluated on the tuning split
(validation images drawn with another seed than the reported ones), next to the `none`
baseline on the same split. Writes `docs/tuning.md`: what was tried and what it gave, so the
choice of defaults can be checked and redone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from pathlib import Path
from typing import Any

from bench.presets import PRESETS, student_spec
from bench.report import _pct
from bench.runs import Run, read_run, run_grid
from bench.table import make_data, make_tune_data, teacher_weights

# Each variant changes one thing from the defaults in hmkd_core/spec.py. The first six are
# the default run; the others are tried when there is time (`--variants`).
VARIANTS: dict[str, dict[str, Any]] = {
    "none (baseline)": {"method": "none"},
    "hmkd defaults": {"method": "hmkd"},
    "hmkd, weights x3": {"method": "hmkd", "weight": 3.0},
    "hmkd, weights x10": {"method": "hmkd", "weight": 10.0},
    "hmkd, HM dim 32": {"method": "hmkd", "hmkd": {"hm": {"dim": 32}}},
    "hmkd, weights x0.3": {"method": "hmkd", "weight": 0.3},
    "hmkd, window 5": {"method": "hmkd", "hmkd": {"hm": {"window": 5}}},
    "hmkd, SDM alpha 2 beta 0.25": {
        "method": "hmkd",
        "hmkd": {"sdm": {"alpha": 2.0, "beta": 0.25}},
    },
    "hmkd, SDM gamma 0": {"method": "hmkd", "hmkd": {"sdm": {"gamma": 0.0}}},
    "hmkd, level weights p2 2, p3 1, p4 0.5": {
        "method": "hmkd",
        "hmkd": {"hm": {"level_weights": {"p2": 2.0, "p3": 1.0, "p4": 0.5}}},
    },
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Try HMKD variants on the tuning split.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--work", type=Path, default=Path("runs/bench"))
    p.add_argument("--teacher", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=None, help=f"subset of: {list(VARIANTS)}")
    p.add_argument("--out", type=Path, default=Path("docs/tuning.md"))
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    names = args.variants or list(VARIANTS)[:6]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    work = (args.work / preset.name).resolve()
    data = make_data(preset, work / "data")
    tune = make_tune_data(preset, work / "tune_data")
    teacher = teacher_weights(preset, work, data, args.teacher)
    runs = [
        Run(
            name,
            student_spec(preset, data, teacher, VARIANTS[name], seed=args.seed, val_root=tune),
            work / "tune" / f"{i:02d}_seed{args.seed}",
        )
        for i, name in enumerate(VARIANTS)
        if name in names
    ]
    run_grid(runs, jobs=preset.jobs, threads=preset.threads)
    lines = ["| variant | AP | AP_S | Δ AP_S vs none |", "|---|---|---|---|"]
    base = None
    for run in runs:
        if not run.done:
            lines.append(f"| {run.key} | failed | | |")
            continue
        m = read_run(run.out)["metrics"]
        ap_s = _pct(m.get("AP_S")) or 0.0
        if run.key.startswith("none"):
            base = ap_s
        delta = "" if base is None or run.key.startswith("none") else f"{ap_s - base:+.1f}"
        lines.append(f"| {run.key} | {_pct(m.get('AP')) or 0.0:.1f} | {ap_s:.1f} | {delta} |")
    command = shlex.join(["python", "-m", "bench.tune", *(argv or sys.argv[1:])])
    args.out.write_text(
        f"""# Tuning HMKD's defaults (preset `{preset.name}`)

`{command}`, finished {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC. Seed {args.seed}, the
preset's schedule; evaluated on the tuning split ({preset.tune_val} validation images drawn
with data seed {preset.data["seed"] + 1}), which `docs/results.md` never reports. One seed
per variant, so differences under about a point are noise.

{chr(10).join(lines)}
"""
    )
    print(f"[tune] wrote {args.out}")


if __name__ == "__main__":
    main()
