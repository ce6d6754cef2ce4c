"""Pair a row of one table with a row of another, seed by seed, where both started alike.

    python -m bench.across hituav-cpu-extended:hmkd hituav-cpu-extended-base:hmkd \\
        --results bench/results/fifth-stages

A table pairs each row with its own `none`. Two presets that share their base student but not
their teacher (or any other input) answer a different question: what changing that input does
to the same row. Their runs share the seeds and the starting weights, so the difference of
the two rows is paired too, and its interval is much tighter than comparing the two tables'
deltas by eye. Runs that did not start from the same weights are refused, not paired.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.presets import PRESETS, ROWS
from bench.records import RESULTS
from bench.report import collect, compare

METRICS = ("AP_S", "AP", "AP50")


def _side(text: str) -> tuple[str, str]:
    preset, sep, row = text.partition(":")
    if not sep or preset not in PRESETS or row not in ROWS:
        raise SystemExit(
            f"{text!r}: expected PRESET:ROW, PRESET one of {sorted(PRESETS)} and ROW one of "
            f"{list(ROWS)}"
        )
    return preset, row


def _runs(preset: str, row: str, results: Path) -> dict[int, dict[str, Any]]:
    p = PRESETS[preset]
    runs = collect(p, (row,), p.seeds, results)["rows"].get(row, {})
    if not runs:
        raise SystemExit(f"{preset}:{row}: no finished run recorded under {results / preset}")
    return runs


def render(left: str, right: str, results: Path) -> str:
    """A markdown table of `left - right`, refused unless every pair started alike."""
    mine, other = _runs(*_side(left), results), _runs(*_side(right), results)
    common = sorted(set(mine) & set(other))
    if not common:
        raise SystemExit(f"{left} and {right} share no seed")
    for seed in common:
        a, b = mine[seed]["inputs"].get("init"), other[seed]["inputs"].get("init")
        if a != b:
            raise SystemExit(
                f"seed {seed}: {left} started from {str(a)[:12]}…, {right} from "
                f"{str(b)[:12]}…: not the same student, so not a paired difference"
            )
    lines = [
        f"`{left}` minus `{right}`, paired over seeds {', '.join(map(str, common))}:",
        "",
        "| metric | split | mean Δ | 95 % CI | reading |",
        "|---|---|---|---|---|",
    ]
    for split, name in (("metrics", "val"), ("tune_metrics", "tuning")):
        for key in METRICS:
            p = compare({"left": mine, "right": other}, "left", key, split, against="right")
            if p is None:
                continue
            ci = "–" if p.lo is None else f"[{p.lo:+.2f}, {p.hi:+.2f}]"
            reading = "within noise" if p.within_noise else ("higher" if p.mean > 0 else "lower")
            lines.append(f"| {key} | {name} | {p.mean:+.2f} | {ci} | {reading} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("left", help="PRESET:ROW, the row measured")
    p.add_argument("right", help="PRESET:ROW, the row it is measured against")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the records are kept")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    text = render(args.left, args.right, args.results)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
