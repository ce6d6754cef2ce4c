"""Does this machine train a preset's stage to the same weights, and what would change them?

    python -m bench.reproduce --preset hituav-cpu --iterations 16

A benchmark table pairs every row with runs that started from the same teacher and base, and
those stages are retrained wherever their weights are missing. This trains the first
`--iterations` of the preset's base student, each in its own process (as the table runs
them), four ways, and prints a digest of the weights each reached:

- `plain`, then `repeat`: the same spec must give the same weights in two processes;
- `evaluated`: with an evaluation every few steps, which must not change the weights;
- `avx2`: with PyTorch's, oneDNN's and MKL's kernels capped at AVX2. On a CPU with wider
  vectors a different digest means the kernels this CPU picks round differently from a
  narrower CPU's, so another machine can train other stages from the same preset.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.data import prepare
from bench.presets import PRESETS, base_student_spec
from bench.run_one import machine
from bench.runs import Run, run_grid
from bench.table import data_root

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def weights_digest(path: Path) -> str:
    """sha256 over a student file's tensors in name order (the file's bytes also hold its
    header, which records when it was written)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def variants(spec: dict[str, Any], iterations: int) -> dict[str, tuple[dict, dict[str, str]]]:
    """name -> (spec, extra environment)."""
    short = json.loads(json.dumps(spec))
    short["schedule"].update(iterations=iterations, warmup_iters=min(4, iterations))
    short["eval"]["every"] = 0
    short["data"].pop("val", None)  # no evaluation at all, unless asked for
    evaluated = json.loads(json.dumps(short))
    evaluated["data"]["val"] = spec["data"]["val"]
    evaluated["eval"]["every"] = max(1, iterations // 2)
    return {
        "plain": (short, {}),
        "repeat": (short, {}),
        "evaluated": (evaluated, {}),
        "avx2": (short, AVX2),
    }


def run(spec: dict[str, Any], env: dict[str, str], out: Path) -> str:
    """Train `spec` in its own process, as the table's grid does, and digest its weights."""
    if run_grid([Run(out.name, spec, out, env=env)], jobs=1, threads=1):
        log = (out / "bench.log").read_text()[-3000:]  # the scratch folder goes with the run
        raise SystemExit(f"{out.name}: the run failed:\n{log}")
    return weights_digest(out / "student.pt")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    p.add_argument("--iterations", type=int, default=16)
    p.add_argument("--work", type=Path, default=Path("runs/bench"))
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    splits = prepare(preset, data_root(preset, args.work.resolve()))
    spec = base_student_spec(preset, splits)
    print(f"machine: {json.dumps(machine())}", flush=True)
    digests: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (variant, env) in variants(spec, args.iterations).items():
            digests[name] = run(variant, env, Path(scratch) / name)
            same = digests[name] == digests["plain"]
            note = "" if name == "plain" else (" same" if same else " DIFFERENT")
            print(f"{name:12s} {digests[name][:16]}{note}", flush=True)


if __name__ == "__main__":
    main()
