"""Run many training specs, a few at a time, each in its own process, and read them back.

A run whose folder already holds `bench.json` is done and is not run again, so a benchmark that
was interrupted (or whose teacher is reused) picks up where it stopped. A run that fails keeps
its folder and log; the grid goes on with the others and the failure is reported at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DETECTION_PREFIX = "student."  # the detector's own losses; distillers log under their name


@dataclass(frozen=True)
class Run:
    key: str  # a label for logs
    spec: dict[str, Any]  # a TrainSpec as a user writes it; defaults apply when the run starts
    out: Path
    tune: tuple[Path, Path] | None = None  # (images, annotations) to evaluate the result on too
    env: dict[str, str] = field(default_factory=dict)  # on top of the grid's (kernel caps, say)

    @property
    def done(self) -> bool:
        return (self.out / "bench.json").is_file()


def run_grid(
    runs: list[Run],
    *,
    jobs: int,
    threads: int,
    on_done: Callable[[Run], None] | None = None,
) -> list[str]:
    """Run what is not done, `jobs` at a time with `threads` torch threads each; `on_done` is
    called as each run finishes well, so an interrupted grid keeps what it finished.

    Returns the keys of runs that failed (their `bench.log` says why).
    """
    pending = [r for r in runs if not r.done]
    if on_done is not None:  # finished earlier but never recorded (a record lost or removed)
        for run in runs:
            if run.done:
                on_done(run)
    active: list[tuple[Run, subprocess.Popen, float]] = []
    failed: list[str] = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    while pending or active:
        while pending and len(active) < jobs:
            run = pending.pop(0)
            if run.out.exists():  # a half-finished earlier attempt: start it clean
                shutil.rmtree(run.out)
            run.out.mkdir(parents=True)
            (run.out / "bench_spec.json").write_text(json.dumps(run.spec, indent=2))
            log = open(run.out / "bench.log", "w")  # noqa: SIM115 (closed with the process)
            cmd = [sys.executable, "-m", "bench.run_one", str(run.out / "bench_spec.json")]
            cmd.append(str(run.out))
            if run.tune is not None:
                cmd += [str(run.tune[0]), str(run.tune[1])]
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, **run.env}
            )
            log.close()
            active.append((run, proc, time.monotonic()))
            print(f"[bench] start {run.key}", flush=True)
        time.sleep(2)
        for item in list(active):
            run, proc, started = item
            if proc.poll() is None:
                continue
            active.remove(item)
            minutes = (time.monotonic() - started) / 60
            if proc.returncode == 0 and run.done:
                print(f"[bench] done  {run.key} in {minutes:.1f} min", flush=True)
                if on_done is not None:
                    on_done(run)
            else:
                failed.append(run.key)
                print(f"[bench] FAILED {run.key} (see {run.out / 'bench.log'})", flush=True)
    return failed


def prune_checkpoints(out: Path) -> None:
    """Remove a recorded run's resumable checkpoints (about 200 MB a HIT-UAV row): the bench
    runs a run again rather than resume it, and reads only its record and `student.pt`."""
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def read_run(out: Path) -> dict[str, Any]:
    """Final metrics, throughput, peak memory and curves of a finished run folder."""
    bench = json.loads((out / "bench.json").read_text())
    result = json.loads((out / "result.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "losses" in r]
    evals = [r for r in records if "eval" in r]
    return {
        "metrics": result.get("metrics") or {},
        "tune_metrics": bench.get("tune_metrics"),
        "images_per_s": statistics.median(r["images_per_s"] for r in train) if train else None,
        "peak_rss_mib": bench["peak_rss_mib"],
        "cuda_peak_mib": bench["cuda_peak_mib"],
        "wall_s": bench["wall_s"],
        "machine": bench.get("machine"),  # absent from runs made before it was recorded
        "curve_iter": [r["iteration"] for r in train],
        "curve_det_loss": [_detection_loss(r["losses"]) for r in train],
        "curve_loss": [r["loss"] for r in train],
        "eval_iter": [r["iteration"] for r in evals],
        "eval_ap_s": [r["eval"].get("AP_S") for r in evals],
        "eval_ap": [r["eval"].get("AP") for r in evals],
    }


def _detection_loss(losses: dict[str, float]) -> float:
    return sum(v for k, v in losses.items() if k.startswith(DETECTION_PREFIX))
