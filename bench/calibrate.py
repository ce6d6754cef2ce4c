"""Each method's distillation weight for a preset, from the gradient ratio.

    python -m bench.calibrate --preset cpu [--target 0.5] [--per-level] [--write]

For every method at weight 1 (its library defaults), on the preset's trained teacher and
starting student, `probe` measures ‖∂L_kd/∂S‖ / ‖∂L_det/∂S‖ over the distilled levels; the
weight that brings that ratio to `--target` is printed; `--write` stores it as the preset's
(`bench/results/<preset>/weights.json`, with the probe's report beside it). A
loss value says little about how hard a term pulls on the student (a sum over many cells can
be large and nearly flat); the gradient on the student's features is what training feels, so
equal ratios put every method on an equal footing.

One ratio over all levels is dominated by the level whose gradients are largest, and the
detector's own gradient is not spread evenly either, so a method can pull one level several
times as hard as the detector and another at a fraction of it. `--per-level` then also sets
`DistillSpec.level_weights` so each level's ratio is the target: the weight-1 probe gives a
first guess (the ratios scale with the weight), and a few more probes correct it by the
secant, since a level's features also reach other levels' losses (HM's decoder hands each
decoded level to the next finer one).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.diagnose import preset_specs
from bench.presets import ROWS
from bench.probe import format_probe, probe
from bench.records import RESULTS
from hmkd_core.spec import METHODS, TrainSpec

# A level within this fraction of the target is done: the probe's own batch-to-batch spread
# is larger than that.
TOLERANCE = 0.05


def _sig(x: float) -> float:
    return float(f"{x:.3g}")


def _next_weight(seen: list[tuple[float, float]], target: float) -> float:
    """A level's next weight from its (weight, ratio) probes so far: the secant through the
    last two, which follows a ratio that is the level's own pull plus what other levels'
    losses send it (HM's decoder) where scaling alone would creep toward it; scaling by
    target / ratio from a single probe. Never below 0: a level whose pull from the others
    alone exceeds the target gets no weight of its own."""
    w1, r1 = seen[-1]
    if len(seen) > 1:
        w0, r0 = seen[-2]
        if r1 != r0 and w1 != w0:
            return _sig(max(0.0, w1 + (target - r1) * (w1 - w0) / (r1 - r0)))
    return _sig(w1 * target / r1) if r1 > 0 else w1


def per_level(
    spec: TrainSpec, first: dict[str, Any], target: float, *, rounds: int, batches: int
) -> tuple[dict[str, float], list[str]]:
    """`spec`'s level weights (at its `distill.weight`) that bring each level's ratio to
    `target`, starting from `first`, the probe at weight 1 and no level weights; with the
    report of each probe it ran."""
    weight = spec.distill.weight
    # at weight 1 and no level weights; every ratio scales with the whole weight
    seen = {lv: [(1.0 / weight, s["grad_ratio"])] for lv, s in first["levels"].items()}
    levels = {lv: _next_weight(history, target) for lv, history in seen.items()}
    blocks = []
    for i in range(rounds):
        spec.distill.level_weights = levels
        result = probe(spec, batches=batches)
        blocks.append(format_probe(f"{spec.distill.method} at weight {weight}, {levels}", result))
        print(blocks[-1], flush=True)
        ratios = {lv: s["grad_ratio"] for lv, s in result["levels"].items()}
        if i == rounds - 1 or all(abs(r / target - 1) <= TOLERANCE for r in ratios.values()):
            break
        for lv, r in ratios.items():
            seen[lv].append((levels[lv], r))
        levels = {lv: _next_weight(history, target) for lv, history in seen.items()}
    return levels, blocks


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--work", type=Path, default=Path("runs/bench"))
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--results", type=Path, default=RESULTS, help="whose stages (bench.table's)")
    p.add_argument(
        "--per-level", action="store_true", help="also set each level's weight to the target"
    )
    p.add_argument("--rounds", type=int, default=3, help="probes per method for --per-level")
    p.add_argument("--write", action="store_true", help="store the weights for the preset")
    args = p.parse_args(argv)
    methods = [m for m in METHODS if m != "none" and m in ROWS]
    specs = preset_specs(args.preset, args.work.resolve(), methods, args.results)
    weights: dict[str, float] = {}
    level_weights: dict[str, dict[str, float]] = {}
    blocks: list[str] = []
    for method, spec in specs.items():
        spec.distill.weight = 1.0  # measure at the library's defaults
        spec.distill.level_weights = {}
        result = probe(spec, batches=args.batches)
        weights[method] = _sig(args.target / result["grad_ratio"])
        blocks.append(format_probe(f"{method} at weight 1", result))
        print(blocks[-1], flush=True)
        if args.per_level:
            spec.distill.weight = weights[method]
            level_weights[method], more = per_level(
                spec, result, args.target, rounds=args.rounds, batches=args.batches
            )
            blocks.extend(more)
    line = f"weights (target ratio {args.target}): {weights}"
    if level_weights:
        line += f"\nlevel weights (each level at the target): {level_weights}"
    print(line)
    if args.write:
        folder = RESULTS / args.preset
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "calibration.txt").write_text("\n\n".join([*blocks, line]) + "\n")
        record: dict[str, Any] = {
            "target_ratio": args.target,
            "batches": args.batches,
            "weights": weights,
        }
        if level_weights:
            record["level_weights"] = level_weights
        (folder / "weights.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {folder / 'weights.json'}: the preset's rows now use these weights")


if __name__ == "__main__":
    main()
