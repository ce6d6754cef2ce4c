"""Print a preset's headline from its committed `summary.json`: what each method buys.

    python -m bench.headline bench/results/cpu/summary.json

The README's demo ends with it, so a newcomer reads the distilled student next to the paired,
repeated evidence of what distillation adds to the same student trained alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def headline(summary: dict) -> str:
    rows = summary["rows"]
    lines = [
        f"{summary['data']} table, preset {summary['preset']} ({summary['protocol']} start): "
        f"AP_S gain over the same student trained alone, mean of paired seeds [95 % CI]"
    ]
    for name, row in rows.items():
        if name == "none":
            lines.append(f"  none (student alone)      AP_S {row['ap_s']:.1f}")
            continue
        ci = row["ci95"]
        interval = "no interval" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"
        verdict = (
            "within noise"
            if row["within_noise"]
            else ("better" if row["delta_ap_s"] > 0 else "worse")
        )
        lines.append(
            f"  {name:<25} AP_S {row['ap_s']:.1f}  Δ {row['delta_ap_s']:+.2f} {interval} "
            f"over {row['seeds']} seeds: {verdict}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        raise SystemExit("usage: python -m bench.headline SUMMARY.json")
    path = Path(args[0])
    if not path.is_file():
        print(f"{path}: no committed table yet (python -m bench.table writes it)")
        return
    print(headline(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
