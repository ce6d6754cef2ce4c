"""A preset's results page, its `summary.json` and its plot, from the committed run records.

Every row is read against `none` seed by seed (the seeds fix data order, augmentation and
initialisation for all rows alike), and each mean difference carries its 95 % t-interval; a
row whose interval holds 0 is marked "within noise". Metrics are COCO AP in percent from
pycocotools at the end of training, on the preset's validation split; the tuning split's
figures are shown apart, since defaults were chosen on them.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on build machines
import matplotlib.pyplot as plt
import torch

from bench.presets import Preset, Splits, is_control, measured_as, row_distill
from bench.records import RESULTS, read_record, record_path, slug
from bench.stats import Paired, paired
from hmkd_core.spec import BASELINE_METHODS

METRICS = ("AP", "AP50", "AP_S", "AP_tiny", "AP_xsmall", "AP_small16_32")
GOAL_GAIN = 3.0  # AP_S points over `none`
PLATEAU_GAIN = 0.5  # AP_S gained over the last third of a run, under which it has plateaued
GOAL_STEP = 1.10  # step over the floor

PAGES = {"cpu": "results.md", "hituav-cpu": "results-hituav.md"}


def page_path(preset: Preset) -> Path:
    return Path("docs") / PAGES.get(preset.name, f"results-{preset.name}.md")


def measure_overhead(
    preset: Preset, splits: Splits, *, rows: tuple[str, ...], rounds: int
) -> dict[str, Any]:
    """Each row's step over the floor, at the preset's sizes, on one thread (a control's or a
    weight-only variant's step is its method's, measured once under the method's row)."""
    from bench.overhead import measure, preset_spec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = preset_spec(preset.name, splits)
        batch = preset.student_schedule["batch_size"]
        steps = tuple(dict.fromkeys(measured_as(r) for r in rows))
        return measure(spec, rounds=rounds, batch_size=batch, rows=steps)
    finally:
        torch.set_num_threads(threads)


def _pct(value: float | None) -> float | None:
    return None if value is None or value < 0 else 100.0 * value


def _metric(record: dict[str, Any], key: str, split: str = "metrics") -> float | None:
    metrics = record.get(split) or {}
    if key.startswith("class:"):
        return _pct((metrics.get("per_category") or {}).get(key[6:]))
    return _pct(metrics.get(key))


def collect(
    preset: Preset, rows: tuple[str, ...], seeds: tuple[int, ...], results: Path
) -> dict[str, Any]:
    """The records a page is built from: teacher, base and every (row, seed) found.

    A run is paired only with runs that started from the same weights, so a record that read
    another teacher or base than the stages recorded here (a stage retrained on another
    machine, whose rows were not all run again) is left out of the table and listed instead.
    """
    teachers = _stages(preset, "teacher", results)
    bases = _stages(preset, "base", results)
    current = {
        key: stages[-1]["inputs"]["student.pt"]
        for key, stages in (("teacher", teachers), ("init", bases))
        if stages
    }
    found: dict[str, dict[int, dict[str, Any]]] = {}
    stale: list[str] = []
    for row in rows:
        for seed in seeds:
            record = read_record(record_path(preset.name, row, seed, results))
            if record is None:
                continue
            if any(record["inputs"].get(k, sha) != sha for k, sha in current.items()):
                stale.append(f"{row} seed {seed}")
            else:
                found.setdefault(row, {})[seed] = record
    return {
        # the rows read the last stage: a teacher still gaining was trained on (`teacher+1`)
        "teacher": teachers[-1] if teachers else None,
        "teachers": teachers,
        "bases": bases,
        "rows": found,
        "stale": stale,
    }


def _stages(preset: Preset, name: str, results: Path) -> list[dict[str, Any]]:
    """A stage's records in training order: `name`, then each extension that was run."""
    labels = (name, *(f"{name}+{k}" for k in range(1, preset.chunks(name) + 1)))
    return [
        r for label in labels if (r := read_record(record_path(preset.name, label, None, results)))
    ]


def compare(
    rows: dict[str, dict[int, dict]],
    row: str,
    key: str,
    split: str = "metrics",
    against: str = "none",
) -> Paired | None:
    """`row` minus `against` on `key`, over the seeds both have."""
    base, mine = rows.get(against, {}), rows.get(row, {})
    deltas = []
    for seed in sorted(set(base) & set(mine)):
        a, b = _metric(mine[seed], key, split), _metric(base[seed], key, split)
        if a is not None and b is not None:
            deltas.append(a - b)
    return paired(deltas) if deltas else None


def _mean(records: dict[int, dict], key: str, split: str = "metrics") -> float | None:
    values = [v for r in records.values() if (v := _metric(r, key, split)) is not None]
    return statistics.fmean(values) if values else None


def plateau_gain(record: dict[str, Any] | None) -> float | None:
    """AP_S gained over the last third of a run (final minus the evaluation nearest 2/3)."""
    if record is None:
        return None
    curves = record["curves"]
    its, aps = curves["eval_iter"], curves["eval_ap_s"]
    final = _metric(record, "AP_S")
    if not its or final is None:
        return None
    mark = 2 * max(its[-1], record["spec"]["schedule"]["iterations"]) / 3
    i = min(range(len(its)), key=lambda k: abs(its[k] - mark))
    earlier = _pct(aps[i])
    return None if earlier is None else final - earlier


def summarize(
    preset: Preset, found: dict[str, Any], overhead: dict[str, Any] | None
) -> dict[str, Any]:
    """The machine-readable summary: per row AP_S, paired Δ AP_S vs none and its interval."""
    rows = found["rows"]
    ratios = (overhead or {}).get("ratio", {})
    out: dict[str, Any] = {}
    for row, records in rows.items():
        d = compare(rows, row, "AP_S") if row != "none" else None
        t = compare(rows, row, "AP_S", "tune_metrics") if row != "none" else None
        out[row] = {
            "ap_s": _mean(records, "AP_S"),
            "delta_ap_s": d.mean if d else (0.0 if row == "none" else None),
            "ci95": [d.lo, d.hi] if d and d.lo is not None else None,
            "within_noise": d.within_noise if d else None,
            "seeds": len(records),
            "step_over_floor": ratios.get(measured_as(row), 1.0 if row == "none" else None),
            "tune_delta_ap_s": t.mean if t else None,
            "tune_ci95": [t.lo, t.hi] if t and t.lo is not None else None,
        }
        method = row.split(":", 1)[0]
        if method != row and (v := compare(rows, row, "AP_S", against=method)):
            out[row]["against_method"] = {
                "method": method,
                "delta_ap_s": v.mean,
                "ci95": [v.lo, v.hi] if v.lo is not None else None,
                "within_noise": v.within_noise,
            }
    for row, points in along_run(rows).items():  # JSON keys are strings
        out[row]["along_run"] = {
            str(i): {"ap_s": v}
            if isinstance(v, float)
            else {"delta_ap_s": v.mean, "ci95": [v.lo, v.hi] if v.lo is not None else None}
            for i, v in points.items()
        }
    teacher_shas = sorted(
        {
            r["inputs"].get("teacher")
            for recs in rows.values()
            for r in recs.values()
            if r["inputs"].get("teacher")
        }
    )
    return {
        "preset": preset.name,
        "protocol": preset.protocol,
        "data": preset.source,
        "teacher_ap_s": _metric(found["teacher"], "AP_S") if found["teacher"] else None,
        "base_ap_s": _metric(found["bases"][-1], "AP_S") if found["bases"] else None,
        "base_plateau_gain_ap_s": plateau_gain(found["bases"][-1]) if found["bases"] else None,
        "base_stages": len(found["bases"]),
        "teachers": len(teacher_shas),
        "rows": out,
    }


def _fmt(v: float | None, digits: int = 1, sign: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _delta_cell(p: Paired | None) -> str:
    if p is None:
        return "–"
    if p.lo is None:
        return f"{p.mean:+.2f} (n=1)"
    return f"{p.mean:+.2f} [{p.lo:+.2f}, {p.hi:+.2f}]"


def _verdict(p: Paired | None) -> str:
    if p is None or p.lo is None:
        return "–"
    if p.within_noise:
        return "within noise"
    return "better" if p.lo > 0 else "worse"


def _main_table(preset: Preset, found: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    rows = found["rows"]
    head = ["row", "seeds", "AP_S", "Δ AP_S vs none [95 % CI]", "verdict"]
    head += [f"Δ {k}" for k in METRICS if k != "AP_S"] + ["step / floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, records in rows.items():
        d = compare(rows, row, "AP_S") if row != "none" else None
        cells = [
            row,
            str(len(records)),
            _fmt(_mean(records, "AP_S")),
            _delta_cell(d) if row != "none" else "",
            _verdict(d) if row != "none" else "",
        ]
        for k in METRICS:
            if k == "AP_S":
                continue
            if row == "none":
                cells.append(_fmt(_mean(records, k)))
            else:
                p = compare(rows, row, k)
                cells.append(_fmt(p.mean if p else None, 2, sign=True))
        ratio = summary["rows"][row]["step_over_floor"]
        cells.append(_fmt(ratio, 3))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _seed_table(found: dict[str, Any], seeds: tuple[int, ...], split: str) -> list[str]:
    head = ["row", *[f"seed {s}" for s in seeds], "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, records in found["rows"].items():
        cells = [_fmt(_metric(records[s], "AP_S", split)) if s in records else "–" for s in seeds]
        lines.append(
            f"| {row} | " + " | ".join(cells) + f" | {_fmt(_mean(records, 'AP_S', split))} |"
        )
    return lines


def _class_table(found: dict[str, Any]) -> list[str]:
    rows = found["rows"]
    any_rec = next(iter(next(iter(rows.values())).values()))
    classes = list(any_rec["metrics"].get("per_category") or {})
    if not classes or "none" not in rows:
        return []
    head = ["row", *[f"{c} AP" for c in classes]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, records in rows.items():
        cells = []
        for c in classes:
            mean = _mean(records, f"class:{c}")
            if row == "none":
                cells.append(_fmt(mean))
            else:
                cells.append(f"{_fmt(mean)} ({_delta_cell(compare(rows, row, f'class:{c}'))})")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def _tune_table(found: dict[str, Any]) -> list[str]:
    rows = found["rows"]
    lines = ["| row | Δ AP_S vs none on the tuning split [95 % CI] | verdict |", "|---|---|---|"]
    for row in rows:
        if row == "none":
            continue
        p = compare(rows, row, "AP_S", "tune_metrics")
        lines.append(f"| {row} | {_delta_cell(p)} | {_verdict(p)} |")
    return lines


def _variant_table(found: dict[str, Any]) -> list[str]:
    """Each variant (`method: what changes`) against its own method's row, seed by seed: an
    ablation is read against the method it changes, not only against `none`."""
    rows = found["rows"]
    lines = []
    for row in rows:
        method = row.split(":", 1)[0]
        if method != row and method in rows and (p := compare(rows, row, "AP_S", against=method)):
            t = compare(rows, row, "AP_S", "tune_metrics", against=method)
            cells = f"{_delta_cell(p)} | {_verdict(p)} | {_delta_cell(t)}"
            lines.append(f"| {row} | {method} | {cells} |")
    if not lines:
        return []
    head = "| variant | against | Δ AP_S [95 % CI] | verdict | Δ AP_S on the tuning split |"
    return [head, "|---|---|---|---|---|", *lines]


def along_run(rows: dict[str, dict[int, dict]]) -> dict[str, dict[int, Paired | float]]:
    """Each row against `none` at every evaluation during the runs (`none`: its mean AP_S),
    when they were evaluated more than once, else nothing: whether a row's loss (or gain)
    shrinks, holds or grows as training goes on. The evaluations choose nothing (a run keeps
    its last weights), so the last point is the table's own figure."""

    def at(record: dict[str, Any]) -> dict[int, float]:
        curves = record.get("curves") or {}
        pairs = zip(curves.get("eval_iter", []), curves.get("eval_ap_s", []), strict=True)
        return {i: 100.0 * v for i, v in pairs if v is not None}

    points = {row: {seed: at(r) for seed, r in recs.items()} for row, recs in rows.items()}
    iters = sorted({i for recs in points.values() for p in recs.values() for i in p})
    if len(iters) < 2 or "none" not in points:
        return {}
    none = points.pop("none")
    out: dict[str, dict[int, Paired | float]] = {"none": {}}
    for i in iters:
        if values := [p[i] for p in none.values() if i in p]:
            out["none"][i] = statistics.fmean(values)
    for row, recs in points.items():
        out[row] = {}
        for i in iters:
            deltas = [p[i] - none[s][i] for s, p in recs.items() if i in p and i in none.get(s, {})]
            if deltas:
                out[row][i] = paired(deltas)
    return out


def _along_table(found: dict[str, Any]) -> list[str]:
    along = along_run(found["rows"])
    if not along:
        return []
    iters = sorted({i for points in along.values() for i in points})
    lines = [
        "| row | " + " | ".join(f"iteration {i}" for i in iters) + " |",
        "|---|" + "---|" * len(iters),
    ]
    for row, points in along.items():
        cells = [_along_cell(points.get(i)) for i in iters]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def _along_cell(v: Paired | float | None) -> str:
    """`none`'s mean AP_S, another row's paired Δ, or a dash where no seed reached it."""
    if v is None:
        return "–"
    return f"AP_S {v:.1f}" if isinstance(v, float) else _delta_cell(v)


def _stale_line(stale: list[str]) -> str:
    if not stale:
        return ""
    return (
        f"\n\nLeft out: {len(stale)} run record(s) made from another teacher or base than the "
        f"stages recorded here, so not paired with this table's runs: {', '.join(stale)}."
    )


def _goal(summary: dict[str, Any]) -> str:
    rows = summary["rows"]
    h = rows.get("hmkd")
    if h is None or h["ci95"] is None:
        return "HMKD has fewer than two paired seeds here: no verdict on the goal."
    gain_ok = h["delta_ap_s"] >= GOAL_GAIN and h["ci95"][0] > 0
    others = {
        r: v["ap_s"] for r, v in rows.items() if r in BASELINE_METHODS and v["ap_s"] is not None
    }
    beats = bool(others) and all(h["ap_s"] > v for v in others.values())
    step_ok = h["step_over_floor"] is not None and h["step_over_floor"] <= GOAL_STEP
    parts = [
        f"mean Δ AP_S {h['delta_ap_s']:+.2f} [{h['ci95'][0]:+.2f}, {h['ci95'][1]:+.2f}] "
        f"({'meets' if gain_ok else 'misses'} ≥ +{GOAL_GAIN:.1f} with the interval above 0)",
        (
            f"AP_S {h['ap_s']:.2f} against "
            + ", ".join(f"{r} {v:.2f}" for r, v in others.items())
            + f" ({'above all' if beats else 'not above all'})"
            if others
            else "no baseline row (mimic, fgd, mgd) has finished runs to compare with"
        ),
        f"step / floor {_fmt(h['step_over_floor'], 3)} "
        f"({'within' if step_ok else 'over or unmeasured'} {GOAL_STEP})",
    ]
    met = gain_ok and beats and step_ok
    return f"**Goal {'met' if met else 'not met'}** for `hmkd`: " + "; ".join(parts) + "."


def plot_deltas(found: dict[str, Any], path: Path, title: str) -> Path:
    rows = [r for r in found["rows"] if r != "none"]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    for i, row in enumerate(rows):
        p = compare(found["rows"], row, "AP_S")
        if p is None:
            continue
        colour = "#d48a6a" if row.startswith("hmkd") else "#4c72b0"
        if p.lo is not None:
            ax.plot([p.lo, p.hi], [i, i], color=colour, lw=2)
        ax.plot([p.mean], [i], "o", color=colour)
    ax.axvline(0.0, color="grey", ls="--")
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xlabel("Δ AP_S vs none (points), mean and 95 % t-interval over paired seeds")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _schedule(s: dict[str, Any] | None) -> str:
    if not s:
        return "–"
    return f"{s['iterations']} iterations × {s['batch_size']} images, AdamW lr {s['lr']}, cosine"


def _data_line(preset: Preset) -> str:
    d = preset.data
    if d["kind"] == "digits":
        return (
            f"SmallDigits, {d['train']} training and {d['val']} validation images of "
            f"{d['size']} px (data seed {d['seed']}); tuning split: {d['tune']} images drawn "
            f"with data seed {d['seed'] + 1}. Every object is COCO-small."
        )
    return (
        f"{d['title']} ({d['cite']}), read from `{d['root']}`: the official val split is "
        "reported; "
        f"{d['tune']} train images spread over the id order are held out of training as the "
        f"tuning split. Input resized to {preset.input_size[0]}–{preset.input_size[1]} px; "
        "AP_S and the tiny ranges use annotation areas at native size (COCO's rule)."
    )


def _model_line(part: dict[str, Any]) -> str:
    return f"Faster R-CNN {part['backbone']}-FPN{part['fpn_channels']}"


def write_all(
    out: Path,
    *,
    preset: Preset,
    rows: tuple[str, ...],
    seeds: tuple[int, ...],
    results: Path,
    overhead: dict[str, Any] | None,
    command: str,
    started: dt.datetime,
    finished: dt.datetime,
    host: str,
) -> dict[str, Any]:
    """Write `summary.json`, the plot and the page; returns the summary."""
    folder = results / preset.name
    folder.mkdir(parents=True, exist_ok=True)
    overhead_file = folder / "overhead.json"
    if overhead is not None:
        overhead_file.write_text(json.dumps(overhead, indent=1) + "\n")
    elif overhead_file.is_file():
        overhead = json.loads(overhead_file.read_text())
    found = collect(preset, rows, seeds, results)
    if "none" not in found["rows"]:
        raise SystemExit(
            f"{preset.name}: no finished 'none' run under {folder}: nothing to compare"
        )
    summary = summarize(preset, found, overhead)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    out.parent.mkdir(parents=True, exist_ok=True)
    plot_dir = out.parent / "results"
    plot_dir.mkdir(exist_ok=True)
    plot = plot_deltas(
        found,
        plot_dir / f"{_plot_name(preset, results)}_delta_ap_s.png",
        f"{preset.source}, preset {preset.name} ({preset.protocol} start)",
    )
    body = _page(preset, found, summary, seeds, overhead, folder, plot.relative_to(out.parent))
    head = (
        f"- **Command**: `{command}` (rendered {finished:%Y-%m-%d %H:%M} UTC on {host}; this "
        f"rendering started {started:%Y-%m-%d %H:%M})."
    )
    out.write_text(body.replace("<<command>>", head))
    return summary


def _elsewhere(results: Path) -> bool:
    """Records kept outside the default folder: a second table of a preset's, say."""
    return results.resolve() != RESULTS.resolve()


def _plot_name(preset: Preset, results: Path) -> str:
    """The preset's name for the committed table; a second table of the same preset (records
    kept elsewhere) gets its folder's name too, so its plot never replaces the first's."""
    if not _elsewhere(results):
        return slug(preset.name)
    return slug(f"{preset.name}-{results.name}")


def _results_arg(folder: Path) -> str:
    """` --results DIR` when a preset's records are kept outside the default folder."""
    results = folder.parent
    return f" --results {_shown(results)}" if _elsewhere(results) else ""


def _shown(folder: Path) -> str:
    """The records' folder as the page names it: relative to the project when inside it."""
    try:
        return folder.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return folder.as_posix()


def _protocol_line(preset: Preset, bases: list[dict[str, Any]], gain: float | None) -> str:
    student = _model_line(preset.student)
    rows_schedule = _schedule(preset.student_schedule)
    if preset.protocol == "scratch":
        return f"every row trains a {student} from random weights for {rows_schedule}"
    plateau = (
        "–"
        if gain is None
        else f"{gain:+.2f} AP_S over the last third of its last stage "
        + (
            f"(plateau: under {PLATEAU_GAIN})"
            if gain < PLATEAU_GAIN
            else f"(still gaining {PLATEAU_GAIN} or more: not at its plateau)"
        )
    )
    return (
        f"every row continues from the same base student, a {student} trained alone "
        f"({_stage_chain(bases)}; {plateau}), for {rows_schedule}"
    )


def _stage_chain(stages: list[dict[str, Any]]) -> str:
    """Each stage's AP_S after its schedule, in order: an extension runs while one gains, and
    a teacher read at a larger input than the first stage's trains a last chunk there."""

    def size(r: dict[str, Any]) -> tuple[int, int]:
        return r["spec"]["student"]["min_size"], r["spec"]["student"]["max_size"]

    chain = ""
    for i, r in enumerate(stages):
        if i:
            lo, hi = size(r)
            resized = (lo, hi) != size(stages[0])
            chain += f"; then, at input {lo}–{hi} px, " if resized else "; then, still gaining, "
        chain += f"AP_S {_fmt(_metric(r, 'AP_S'))} after {_schedule(r['spec']['schedule'])}"
    return chain or "–"


def _section(title: str, lines: list[str], intro: str = "") -> str:
    if not lines:
        return ""
    return f"\n## {title}\n\n{intro}{chr(10).join(lines)}\n"


def _page(
    preset: Preset,
    found: dict[str, Any],
    summary: dict[str, Any],
    seeds: tuple[int, ...],
    overhead: dict[str, Any] | None,
    folder: Path,
    plot: Path,
) -> str:
    teacher = found["teacher"]
    weights = ", ".join(f"{m} {w:g}" for m, w in sorted(preset.weights.items()))
    if preset.level_weights:  # calibrated level by level (`bench.calibrate --per-level`)
        per_level = "; ".join(
            f"{m} " + ", ".join(f"{lv} {w:g}" for lv, w in levels.items())
            for m, levels in sorted(preset.level_weights.items())
        )
        weights += f"; times each level's weight: {per_level}"
    rows_spec = [
        f"- `{r}`: `{json.dumps(row_distill(preset, r))}`"
        + (", from a random teacher (`bench.controls`)" if is_control(r) else "")
        for r in found["rows"]
    ]
    readers = (
        "the weights every row reads but the random-teacher controls"
        if any(is_control(r) for r in found["rows"])
        else "the weights every row reads"
    )
    wall = sum(r["cost"]["wall_s"] for recs in found["rows"].values() for r in recs.values())
    ovh = (
        f"{overhead['rounds']} interleaved rounds, 1 thread, batch {overhead['batch_size']}, "
        f"floor {overhead['floor_ms']:.0f} ms"
        if overhead
        else "not measured"
    )
    # the calibration's probe is the same report at weight 1 (the ratios scale with it)
    diagnose = next(
        (f for f in (folder / "diagnose.txt", folder / "calibration.txt") if f.is_file()),
        folder / "diagnose.txt",
    )
    # written by hand beside the records: what the table is (intro) and what it says (reading)
    reading = folder / "reading.md"
    intro = folder / "intro.md"
    t_ap = _fmt(_metric(teacher, "AP") if teacher else None)
    t_aps = _fmt(_metric(teacher, "AP_S") if teacher else None)
    protocol = _protocol_line(preset, found["bases"], summary["base_plateau_gain_ap_s"])
    # SmallDigits' ten digits are all alike and small; a real data set's classes are not
    classes = _class_table(found) if preset.data["kind"] == "coco" else []
    sections = "".join(
        [
            _section("Per class", classes, "AP (%), mean (paired Δ vs none [95 % CI]):\n\n"),
            _section(
                "Along the run",
                _along_table(found),
                "AP_S on the reported split at each evaluation: `none`'s mean, and every other "
                "row's paired Δ vs none [95 % CI]:\n\n",
            ),
            _section("The tuning split (where defaults are chosen)", _tune_table(found)),
            _section(
                "Variants against their method",
                _variant_table(found),
                "Paired over the seeds both rows have (variant minus method, AP points):\n\n",
            ),
            _section("The rows", rows_spec),
            _section(
                "Diagnostics",
                _fenced(diagnose),
                f"`python -m bench.diagnose --preset {preset.name}{_results_arg(folder)}`:\n\n"
                if diagnose.name == "diagnose.txt"
                else f"`python -m bench.calibrate --preset {preset.name} --write`, each method "
                "at weight 1 (at the calibrated weight every gradient ratio is the target and "
                "the other figures are the same):\n\n",
            ),
        ]
    )
    return f"""# {preset.source} results: preset `{preset.name}` ({preset.protocol} start)

{intro.read_text().rstrip() + chr(10) + chr(10) if intro.is_file() else ""}<<command>>
  Every figure is read from the run records in `{_shown(folder)}/`, each written
  by the run that measured it; the student runs took {wall / 60:.0f} min of run time in all,
  {preset.jobs} at a time, {preset.threads} thread(s) each.
- **Data**: {_data_line(preset)}
- **Teacher**: {_model_line(preset.teacher)} from scratch, {_stage_chain(found["teachers"])};
  AP {t_ap}, AP_S {t_aps} ({readers}).
- **Protocol**: {protocol}.
- **Seeds**: {", ".join(map(str, seeds))}; a seed fixes data order, augmentation and the
  distiller's initialisation, the same in every row, so each row minus `none` is paired.
- **Distillation weights** (this preset's, by gradient ratio, `python -m bench.calibrate`):
  {weights or "the library's defaults"}.
- **Step / floor**: one training step of the method over one student step plus one teacher
  forward ({ovh}). A random-teacher control, or a variant that changes only the weight, shows
  its method's step: it computes the same thing.

{_goal(summary)}{_stale_line(found["stale"])}

## Every row against the student trained alone

Δ columns are paired means over the seeds (row minus `none`, AP points); "within noise": the
95 % t-interval holds 0. The `none` row shows its own values instead.

{chr(10).join(_main_table(preset, found, summary))}

![Δ AP_S per row]({plot})

AP_S (%) of every run, seed by seed:

{chr(10).join(_seed_table(found, seeds, "metrics"))}
{sections}
{reading.read_text() if reading.is_file() else ""}"""


def _fenced(path: Path) -> list[str]:
    return ["```", path.read_text().rstrip(), "```"] if path.is_file() else []
