"""One command per preset runs the whole comparison and writes its page and summary.

    python -m bench.table --preset cpu          # warm-start SmallDigits table, 2 CPU cores
    python -m bench.table --preset hituav-cpu   # HIT-UAV, real thermal drone images
    python -m bench.table --preset cpu --render # re-render from the committed records only

It makes the data, trains the teacher (and, for the warm protocol, the student alone to its
plateau), then trains every row for every seed, each row from the same starting point with
the same seeds, so each row minus `none` is a paired difference. Each finished run leaves a
record under `bench/results/<preset>/` (committed); a run whose record matches its spec is
not run again, so a table can be built over several sittings. Run folders (weights, logs)
live in `--work` and are not committed; they are named by what they compute, so presets with
the same stages share them, and two table commands that share runs must not run at once on
one `--work` (the second would restart the first's unfinished runs).

A row may distil from a random teacher (`bench.controls`), a negative control; rows that read
no trained teacher (`none` and the controls) can run before the teacher is trained: a table
asked for those rows alone does not train it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import platform
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import report
from bench.controls import random_teacher
from bench.data import prepare
from bench.presets import (
    PRESETS,
    ROWS,
    Preset,
    Splits,
    base_student_spec,
    extension_spec,
    is_control,
    reads_trained_teacher,
    row_distill,
    student_spec,
    teacher_model,
    teacher_resize_spec,
    teacher_spec,
)
from bench.records import (
    RESULTS,
    file_sha256,
    read_record,
    record_path,
    slug,
    spec_hash,
    write_record,
)
from bench.runs import Run, prune_checkpoints, read_run, run_grid
from hmkd_core.spec import ModelSpec


def data_root(preset: Preset, work: Path) -> Path:
    """One data folder per data settings, shared by the presets that use the same data.

    The citation is left out of the key: rewording it must not orphan the prepared splits,
    nor change the hash of every spec (and so of every record) that reads them.
    """
    settings = {k: v for k, v in preset.data.items() if k != "cite"}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return work / "data" / f"{slug(preset.source)}-{key}"


def roots_of(work: Path, preset: Preset) -> dict[str, Path]:
    roots = {"work": work.resolve()}
    if preset.data["kind"] == "coco":
        roots["data"] = Path(preset.data["root"]).resolve()
    return roots


def run_stages(
    preset: Preset,
    work: Path,
    splits: Splits,
    *,
    teacher: Path | None,
    results: Path,
    train_teacher: bool = True,
) -> tuple[Path | None, Path | None]:
    """Train the teacher and (warm protocol) the base student, side by side, each to its
    plateau: one still gaining continues for another chunk, up to `max_extensions` times.
    Every stage is recorded (`teacher`, `teacher+1`, `base`, `base+1`, ...). A preset may cap
    the teacher apart (`teacher_extensions`), to distil one base from teachers of two strengths,
    and may read its teacher at a larger input: then one more chunk trains it at that size.

    A table whose rows read no trained teacher (`none` and random-teacher controls) passes
    `train_teacher=False` and starts its rows without waiting for one.

    Returns the last teacher's (None if not trained) and base's `student.pt` (None for the
    scratch protocol).
    """
    roots = roots_of(work, preset)
    specs: dict[str, dict[str, Any]] = {}
    if teacher is None and train_teacher:
        specs["teacher"] = teacher_spec(preset, splits)
    if preset.protocol == "warm":
        specs["base"] = base_student_spec(preset, splits)
    latest: dict[str, tuple[Path, dict[str, Any]]] = {}  # stage -> (weights, record)
    chunks: dict[str, int] = {}  # stage -> its last chunk so far
    k = 0  # the chunk: 0 is the stage's own schedule, k > 0 its k-th extension
    while specs:  # each stage stops at its plateau or at its own cap (the filter below)
        runs = {
            (name if k == 0 else f"{name}+{k}"): Run(
                name, spec, work / "stages" / f"{name}{k or ''}-{spec_hash(spec, roots)[:10]}"
            )
            for name, spec in specs.items()
        }
        failed = run_grid(list(runs.values()), jobs=preset.jobs, threads=preset.threads)
        if failed:
            raise SystemExit(f"{failed} failed; see bench.log in {work / 'stages'}")
        for label, run in runs.items():
            record = _record_stage(preset, label, run, roots, results)
            latest[run.key] = (run.out / "student.pt", record)
            chunks[run.key] = k
        specs = {  # what is still gaining continues from where it stopped
            name: extension_spec(preset, splits, name, latest[name][0])
            for name in specs
            if k < preset.extensions(name)
            and (gain := report.plateau_gain(latest[name][1])) is not None
            and gain >= report.PLATEAU_GAIN
        }
        k += 1
    if "teacher" in latest and preset.teacher_input_size is not None:
        # the teacher's last chunk, at the size the rows read it: it starts from what the
        # teacher learnt at the student's size, so it only has to adapt to the larger input
        k = chunks["teacher"] + 1
        spec = teacher_resize_spec(preset, splits, latest["teacher"][0])
        label = f"teacher+{k}"
        run = Run("teacher", spec, work / "stages" / f"teacher{k}-{spec_hash(spec, roots)[:10]}")
        if run_grid([run], jobs=1, threads=preset.threads):
            raise SystemExit(f"{label} failed; see bench.log in {work / 'stages'}")
        latest["teacher"] = (
            run.out / "student.pt",
            _record_stage(preset, label, run, roots, results),
        )
    trained = latest["teacher"][0] if "teacher" in latest else None
    teacher_path = teacher.resolve() if teacher is not None else trained
    return teacher_path, latest["base"][0] if "base" in latest else None


def _record_stage(
    preset: Preset, name: str, run: Run, roots: dict[str, Path], results: Path
) -> dict[str, Any]:
    """Record a finished stage, unless the folder holds this stage made from the same spec
    with other weights: training on another kind of CPU rounds differently, and the rows
    recorded there were paired on the old weights, so they must not be replaced silently.
    A record of these very weights is kept as it is: every command that reuses a stage passes
    here, and rewriting would only churn its time and cost in the committed records."""
    path = record_path(preset.name, name, None, results)
    sha = file_sha256(run.out / "student.pt")
    hash_ = spec_hash(run.spec, roots)
    earlier = read_record(path, hash_)
    if earlier is not None:
        if earlier["inputs"]["student.pt"] == sha:
            return earlier
        raise SystemExit(
            f"{name}: trained again from the same spec, it came out with other weights "
            f"(sha256 {sha[:12]}…; {path} records {earlier['inputs']['student.pt'][:12]}…), "
            f"so the rows recorded under {path.parent.parent} are not paired with it. Keep "
            "those records and start a separate table on these weights with another --results "
            "folder (the trained stages are reused), or delete that folder's records to "
            "replace them."
        )
    return write_record(
        path,
        preset=preset.name,
        row=name,
        seed=None,
        hash_=hash_,
        run=read_run(run.out),
        spec=run.spec,
        roots=roots,
        inputs={"student.pt": sha},
    )


def _inputs_of(row: str, inputs: dict[str, str], drawn: Path | None) -> dict[str, str]:
    """The weights a row reads: a student trained alone never reads the teacher, and a row
    with a random teacher reads that one (under its own key: it is no stage of the table)."""
    used = {k: v for k, v in inputs.items() if k != "teacher"}
    if drawn is not None:
        used["random_teacher"] = file_sha256(drawn)
    elif ROWS[row]["method"] != "none":
        used["teacher"] = inputs["teacher"]
    return used


def row_spec(
    preset: Preset,
    work: Path,
    splits: Splits,
    row: str,
    seed: int,
    *,
    teacher: Path | None,
    base: Path | None,
) -> tuple[dict[str, Any], Path | None]:
    """A row's run spec for `seed`, and the random teacher it reads (None for a row of the
    trained teacher, `teacher`, which only a table without such rows may lack)."""
    drawn = None
    if is_control(row):
        model = ModelSpec.model_validate(teacher_model(preset))
        drawn = random_teacher(model, splits.train, seed=seed, folder=work / "controls")
    distill = row_distill(preset, row)
    spec = student_spec(preset, splits, drawn or teacher, distill, seed=seed, init=base)
    return spec, drawn


def run_rows(
    preset: Preset,
    work: Path,
    splits: Splits,
    *,
    teacher: Path | None,
    base: Path | None,
    rows: tuple[str, ...],
    seeds: tuple[int, ...],
    results: Path,
) -> list[str]:
    """Every (row, seed) without a matching record; records written as runs finish."""
    roots = roots_of(work, preset)
    inputs = {"teacher": file_sha256(teacher)} if teacher is not None else {}
    if base is not None:
        inputs["init"] = file_sha256(base)
    pending: dict[Path, tuple[str, int, str, dict[str, str]]] = {}
    runs: list[Run] = []
    for row in rows:  # a row's seeds run side by side, under the same load
        for seed in seeds:
            spec, drawn = row_spec(preset, work, splits, row, seed, teacher=teacher, base=base)
            h = spec_hash(spec, roots)
            used = _inputs_of(row, inputs, drawn)
            if read_record(record_path(preset.name, row, seed, results), h, used) is not None:
                continue
            # the folder is named by what the run computes: its spec and the weights it reads
            # (a retrained teacher keeps its path), not by the preset that asked for it, so
            # presets sharing stages share the runs they have in common, as they share stages
            key = hashlib.sha256(f"{h} {sorted(used.items())}".encode()).hexdigest()
            out = work / "rows" / slug(row) / f"seed{seed}-{key[:10]}"
            pending[out] = (row, seed, h, used)
            runs.append(Run(f"{row} seed {seed}", spec, out, splits.tune))

    def record(run: Run) -> None:
        row, seed, h, used = pending[run.out]
        write_record(
            record_path(preset.name, row, seed, results),
            preset=preset.name,
            row=row,
            seed=seed,
            hash_=h,
            run=read_run(run.out),
            spec=run.spec,
            roots=roots,
            inputs=used,
        )
        prune_checkpoints(run.out)  # a row is never resumed, and the stages are kept whole

    return run_grid(runs, jobs=preset.jobs, threads=preset.threads, on_done=record)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run the comparison table for one preset.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--work", type=Path, default=Path("runs/bench"), help="where runs are kept")
    p.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="reuse this teacher student.pt (trained at the size the rows read it: a preset "
        "with teacher_input_size trains no chunk of its own then)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--rows", nargs="+", default=None, help=f"subset of: {', '.join(ROWS)}")
    p.add_argument("--stages-only", action="store_true", help="train teacher and base, then stop")
    p.add_argument("--render", action="store_true", help="only re-render from the records")
    p.add_argument(
        "--measure-overhead",
        action="store_true",
        help="with --render: measure the step / floor ratios again (else the stored ones)",
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="where records are kept")
    p.add_argument("--out", type=Path, default=None, help="results page (default docs/...)")
    p.add_argument(
        "--overhead-rounds",
        type=int,
        default=8,
        help="rounds of the step / floor measure; 0 keeps the stored ratios (runs scheduled "
        "one by one beside other work, measured once on the idle machine at the end)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs at once (default: the preset's); fewer where other work shares the cores",
    )
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.jobs is not None:
        if args.jobs < 1:
            raise SystemExit(f"--jobs: must be at least 1, got {args.jobs}")
        preset = replace(preset, jobs=args.jobs)
    seeds = tuple(args.seeds or preset.seeds)
    rows = tuple(dict.fromkeys(args.rows or preset.rows))  # a row named twice runs once
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {unknown}; choose from {list(ROWS)}")
    if "none" not in rows:
        raise SystemExit(
            "--rows: the table needs the 'none' row, every other row is paired with it"
        )
    if args.overhead_rounds < 0:
        raise SystemExit(f"--overhead-rounds: must be 0 or more, got {args.overhead_rounds}")
    if args.teacher is not None and not args.teacher.is_file():
        raise SystemExit(f"--teacher: {args.teacher} is not a file")
    work = args.work.resolve()
    started = dt.datetime.now(dt.UTC)
    failed: list[str] = []
    splits = prepare(preset, data_root(preset, work))
    if not args.render:
        teacher, base = run_stages(
            preset,
            work,
            splits,
            teacher=args.teacher,
            results=args.results,
            train_teacher=args.stages_only or any(reads_trained_teacher(r) for r in rows),
        )
        if args.stages_only:
            print(f"[bench] teacher {teacher}\n[bench] base {base}")
            return
        failed = run_rows(
            preset,
            work,
            splits,
            teacher=teacher,
            base=base,
            rows=rows,
            seeds=seeds,
            results=args.results,
        )
    overhead = (
        report.measure_overhead(preset, splits, rows=rows, rounds=args.overhead_rounds)
        if args.overhead_rounds > 0 and (not args.render or args.measure_overhead)
        else None
    )
    out = args.out or report.page_path(preset)
    report.write_all(
        out,
        preset=preset,
        rows=rows,
        seeds=seeds,
        results=args.results,
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
