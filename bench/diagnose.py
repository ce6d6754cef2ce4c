"""Print what a distillation setup does to the student's features, per level.

    python -m bench.diagnose SPEC.yaml                 # any distill spec, its own weights
    python -m bench.diagnose --preset cpu              # every distilling row of a preset, at
                                                       # its teacher and (warm) base student

Per level: the teacher feature's rms, the focal spatial attention's effective number of cells
(1/Σp²) and its mass on foreground cells, the foreground share of cells, the detection and the
distillation gradient norms on the student's feature and their ratio; then each loss term,
weighted (what the optimiser sees) and raw (before the method's weight); and how often
gradient clipping fires. `--out` also writes the text (the results pages include it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.presets import PRESETS, ROWS, reads_trained_teacher
from bench.probe import format_probe, probe
from bench.records import RESULTS
from hmkd_core.spec import TrainSpec, load_spec


def preset_specs(
    name: str, work: Path, rows: list[str] | None, results: Path = RESULTS
) -> dict[str, TrainSpec]:
    """Each distilling row's spec at the preset's starting student and the teacher it reads
    (the trained one, trained only if a chosen row reads it, or a control's seed-0 draw; the
    stages recorded under `results`)."""
    from bench.data import prepare
    from bench.table import data_root, row_spec, run_stages

    preset = PRESETS[name]
    splits = prepare(preset, data_root(preset, work))
    chosen = rows or [r for r in preset.rows if ROWS[r]["method"] != "none"]
    teacher, base = run_stages(
        preset,
        work,
        splits,
        teacher=None,
        results=results,
        train_teacher=any(reads_trained_teacher(r) for r in chosen),
    )
    return {  # seed 0's, with seed 0's draw for a row of a random teacher
        row: TrainSpec.model_validate(
            row_spec(preset, work, splits, row, 0, teacher=teacher, base=base)[0]
        )
        for row in chosen
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("spec", nargs="?", type=Path, help="a distill spec file")
    src.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--rows", nargs="+", default=None)
    p.add_argument("--work", type=Path, default=Path("runs/bench"))
    p.add_argument("--results", type=Path, default=RESULTS, help="whose stages (bench.table's)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--out", type=Path, default=None, help="also write the text here")
    args = p.parse_args(argv)
    if args.preset:
        specs = preset_specs(args.preset, args.work.resolve(), args.rows, args.results)
    else:
        specs = {args.spec.name: load_spec(args.spec)}
    blocks = []
    for name, spec in specs.items():
        block = format_probe(name, probe(spec, batches=args.batches))
        print(block + "\n", flush=True)
        blocks.append(block)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n\n".join(blocks) + "\n")


if __name__ == "__main__":
    main()
