"""Each method's distillation weight for a preset, from the gradient ratio.

    python -m bench.calibrate --preset cpu [--target 0.5] [--write]

For every method at weight 1 (its library defaults), on the preset's trained teacher and
starting student, `probe` measures ‖∂L_kd/∂S‖ / ‖∂L_det/∂S‖ over the distilled levels; the
weight that brings that ratio to `--target` is printed; `--write` stores it as the preset's
(`bench/results/<preset>/weights.json`, with the probe's report beside it). A
loss value says little about how hard a term pulls on the student (a sum over many cells can
be large and nearly flat); the gradient on the student's features is what training feels, so
equal ratios put every method on an equal footing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.diagnose import preset_specs
from bench.presets import ROWS
from bench.probe import format_probe, probe
from bench.records import RESULTS
from hmkd_core.spec import METHODS


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--work", type=Path, default=Path("runs/bench"))
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--results", type=Path, default=RESULTS, help="whose stages (bench.table's)")
    p.add_argument("--write", action="store_true", help="store the weights for the preset")
    args = p.parse_args(argv)
    methods = [m for m in METHODS if m != "none" and m in ROWS]
    specs = preset_specs(args.preset, args.work.resolve(), methods, args.results)
    weights, blocks = {}, []
    for method, spec in specs.items():
        spec.distill.weight = 1.0  # measure at the library's defaults
        result = probe(spec, batches=args.batches)
        weights[method] = float(f"{args.target / result['grad_ratio']:.3g}")
        blocks.append(format_probe(f"{method} at weight 1", result))
        print(blocks[-1], flush=True)
    line = f"weights (target ratio {args.target}): {weights}"
    print(line)
    if args.write:
        folder = RESULTS / args.preset
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "calibration.txt").write_text("\n\n".join([*blocks, line]) + "\n")
        record = {"target_ratio": args.target, "batches": args.batches, "weights": weights}
        (folder / "weights.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {folder / 'weights.json'}: the preset's rows now use these weights")


if __name__ == "__main__":
    main()
