"""The results page: a markdown table of every row plus its plots, from finished run folders.

Each student cell is the mean over seeds followed by every seed's value, so a reader sees the
spread before trusting a difference. Metrics are COCO AP in percent from pycocotools, at the
end of training (not the best evaluation), on the preset's validation split.
"""

from __future__ import annotations

import datetime as dt
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on build machines
import matplotlib.pyplot as plt
import torch

from bench.presets import Preset

METRICS = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_tiny", "AP_xsmall", "AP_small16_32")


def measure_overhead(preset: Preset, data: Path, *, rounds: int) -> dict[str, Any]:
    """Each distiller's step over the floor, at the preset's sizes, on one thread."""
    from bench.overhead import measure, preset_spec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = preset_spec(preset.name, data)
        return measure(spec, rounds=rounds, batch_size=preset.student_schedule["batch_size"])
    finally:
        torch.set_num_threads(threads)


def _pct(value: float | None) -> float | None:
    return None if value is None or value < 0 else 100.0 * value


def _cell(values: list[float | None], digits: int = 1) -> str:
    if any(v is None for v in values):
        return "–"
    mean = statistics.fmean(values)  # type: ignore[arg-type]
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    each = " / ".join(f"{v:.{digits}f}" for v in values)  # type: ignore[str-format]
    return f"{mean:.{digits}f} ({each})"


def _mem(run: dict[str, Any]) -> float:
    return run["cuda_peak_mib"] if run["cuda_peak_mib"] is not None else run["peak_rss_mib"]


def write_results(
    out: Path,
    *,
    preset: Preset,
    seeds: tuple[int, ...],
    teacher: dict[str, Any] | None,
    teacher_path: Path | None,
    rows: dict[str, dict[int, dict[str, Any]]],
    overhead: dict[str, Any],
    command: str,
    started: dt.datetime,
    finished: dt.datetime,
    host: str,
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_dir = out.parent / "results"
    plot_dir.mkdir(exist_ok=True)
    plots = {
        "ap_s": plot_ap_s(rows, seeds, teacher, plot_dir / f"{preset.name}_ap_s.png"),
        "curves": plot_curves(rows, seeds, plot_dir / f"{preset.name}_curves.png"),
    }
    mem_kind = "GPU peak (MiB)" if preset.device == "cuda" else "peak RSS (MiB)"
    head = ["row", *METRICS, "train img/s", mem_kind, "step / floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if teacher is not None:
        m = teacher["metrics"]
        cells = [_cell([_pct(m.get(k))]) for k in METRICS]
        extra = [f"{teacher['images_per_s']:.2f}", f"{_mem(teacher):.0f}", ""]
        lines.append("| teacher | " + " | ".join(cells + extra) + " |")
    for name, by_seed in rows.items():
        runs = [by_seed[s] for s in seeds]
        cells = [_cell([_pct(r["metrics"].get(k)) for r in runs]) for k in METRICS]
        ratio = overhead["ratio"].get(name)
        extra = [
            _cell([r["images_per_s"] for r in runs], 2),
            _cell([_mem(r) for r in runs], 0),
            "–" if ratio is None else f"{ratio:.3f}",
        ]
        lines.append(f"| {name} | " + " | ".join(cells + extra) + " |")
    base = rows.get("none")
    deltas = []
    if base is not None:
        for name, by_seed in rows.items():
            if name == "none":
                continue
            d = [
                (_pct(by_seed[s]["metrics"].get("AP_S")) or 0.0)
                - (_pct(base[s]["metrics"].get("AP_S")) or 0.0)
                for s in seeds
            ]
            deltas.append(f"| {name} | {_cell(d)} |")
    s = preset.student_schedule
    t = preset.teacher_schedule
    teacher_note = "" if teacher_path is None else f" (reused: `{teacher_path}`)"
    student_wall = sum(r["wall_s"] for by_seed in rows.values() for r in by_seed.values())
    wall = f"students {student_wall / 60:.0f} min of run time ({preset.jobs} at a time)"
    if teacher is not None:
        wall = f"teacher {teacher['wall_s'] / 60:.0f} min, " + wall
    text = f"""# SmallDigits results: preset `{preset.name}`

- **Command**: `{command}`
- **Machine**: {host} (preset for: {preset.machine}); started {started:%Y-%m-%d %H:%M}, \
finished {finished:%Y-%m-%d %H:%M} UTC; {wall}. Every figure here was measured by \
this command (finished runs it found in its work folder are read, not re-run).
- **Seeds**: {", ".join(map(str, seeds))} (students); the teacher is trained once, seed 0.
- **Data**: SmallDigits, {preset.data["train"]} training and {preset.data["val"]} validation \
images of {preset.data["size"]} px (data seed {preset.data["seed"]}; the validation \
handwriting is unseen in training). Every object is COCO-small.
- **Teacher**: Faster R-CNN {preset.teacher["backbone"]}-FPN{preset.teacher["fpn_channels"]} \
from scratch, {t["iterations"]} iterations × {t["batch_size"]} images{teacher_note}.
- **Student**: Faster R-CNN {preset.student["backbone"]}-FPN{preset.student["fpn_channels"]} \
from scratch, {s["iterations"]} iterations × {s["batch_size"]} images, AdamW lr {s["lr"]}, \
cosine decay; {preset.jobs} run(s) at a time, {preset.threads} thread(s) each.
- **Cells**: COCO AP (%) from pycocotools at the end of training on the validation split; a \
student cell is the mean over seeds, then each seed's value in order. `–`: no object of that \
size in the split. Train img/s is the median over logged iterations (runs shared the \
machine). Step / floor: one training step of the method over one student step plus one \
teacher forward, on one batch in one process ({overhead["rounds"]} interleaved rounds, \
1 thread, floor {overhead["floor_ms"]:.0f} ms).

{chr(10).join(lines)}

AP_S of each method minus the student baseline (`none`), seed by seed:

| row | Δ AP_S |
|---|---|
{chr(10).join(deltas)}

![AP_S per method]({plots["ap_s"].relative_to(out.parent)})

![Loss and AP_S over training]({plots["curves"].relative_to(out.parent)})
"""
    out.write_text(text)


def plot_ap_s(
    rows: dict[str, dict[int, dict[str, Any]]],
    seeds: tuple[int, ...],
    teacher: dict[str, Any] | None,
    path: Path,
) -> Path:
    names = list(rows)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, name in enumerate(names):
        values = [_pct(rows[name][s]["metrics"].get("AP_S")) or 0.0 for s in seeds]
        ax.bar(i, statistics.fmean(values), color="#9bb7d4" if name != "hmkd" else "#d48a6a")
        ax.scatter([i] * len(values), values, color="black", zorder=3, s=14)
    if teacher is not None:
        ax.axhline(_pct(teacher["metrics"].get("AP_S")) or 0.0, ls="--", color="grey")
        ax.text(
            len(names) - 0.5,
            _pct(teacher["metrics"].get("AP_S")) or 0.0,
            "teacher",
            ha="right",
            va="bottom",
            color="grey",
        )
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
    ax.set_ylabel("AP_S (%)")
    ax.set_title(f"AP_S per method (bar: mean; dots: seeds {', '.join(map(str, seeds))})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smooth(values: list[float], k: int = 5) -> list[float]:
    return [statistics.fmean(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


def plot_curves(
    rows: dict[str, dict[int, dict[str, Any]]], seeds: tuple[int, ...], path: Path
) -> Path:
    fig, (loss_ax, ap_ax) = plt.subplots(1, 2, figsize=(10, 4))
    colours = {"none": "#4c72b0", "hmkd": "#dd8452"}
    for name in ("none", "hmkd"):
        for s in seeds:
            run = rows.get(name, {}).get(s)
            if run is None:
                continue
            style = "-" if s == seeds[0] else ":"
            loss_ax.plot(
                run["curve_iter"],
                _smooth(run["curve_det_loss"]),
                style,
                color=colours[name],
                label=f"{name} seed {s}",
            )
            ap = [_pct(v) or 0.0 for v in run["eval_ap_s"]]
            ap_ax.plot(
                run["eval_iter"],
                ap,
                style,
                marker="o",
                color=colours[name],
                label=f"{name} seed {s}",
            )
    loss_ax.set_title("detection loss (distillation terms excluded)")
    loss_ax.set_xlabel("iteration")
    ap_ax.set_title("AP_S on the validation split (%)")
    ap_ax.set_xlabel("iteration")
    for ax in (loss_ax, ap_ax):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
