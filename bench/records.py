"""Finished runs as small JSON records kept in the repository, under `bench/results/<preset>/`.

A table is built from these records, not from the (large, uncommitted) run folders, so it can
grow over several days of work and be re-rendered anywhere without training. A record names
the hash of the spec that produced it (paths replaced by their role), so a run is skipped only
when the very same experiment already finished, and a changed preset or default runs again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from hmkd_core.spec import TrainSpec

RESULTS = Path(__file__).resolve().parent / "results"


def _portable(spec: dict[str, Any], roots: dict[str, Path]) -> dict[str, Any]:
    """The spec with each root's path replaced by `<role>`, as JSON-ready data."""
    text = json.dumps(spec, sort_keys=True, default=str)
    for role, root in sorted(roots.items(), key=lambda kv: -len(str(kv[1]))):
        text = text.replace(str(root), f"<{role}>")
    return json.loads(text)


# Options added after records were made, with the default that does what every run did before
# they existed: at that default they are left out of the hash, so those records stay valid (a
# changed default of any other option still changes every hash, and its runs run again).
LATER_OPTIONS: dict[tuple[str, ...], Any] = {
    ("distill", "align_iters"): 0,
    ("distill", "clip_apart"): False,
    ("distill", "level_weights"): {},
    ("distill", "standardize"): False,
    ("distill", "hmkd", "hm", "cell_weights"): "masks",
    ("distill", "hmkd", "hm", "generator"): False,
    ("distill", "hmkd", "hm", "generator_kernel"): 3,
    ("distill", "hmkd", "hm", "mask_ratio"): 0.0,
    ("distill", "hmkd", "hm", "query_pool"): "none",
    ("distill", "hmkd", "hm", "value_grad"): "window",
    ("distill", "response", "box_weight"): 0.0,
    ("distill", "response", "objectness_weight"): 0.0,
    ("distill", "response", "temperature"): 1.0,
    ("distill", "response", "weight"): 0.0,
}


def _drop_empty(full: dict[str, Any], path: list[str]) -> None:
    """Remove the empty dict at `path`, then each parent it leaves empty."""
    while path:
        *up, name = path
        owner = full
        for part in up:
            owner = owner[part]
        if owner[name]:
            return
        del owner[name]
        path = up


def spec_hash(spec: dict[str, Any], roots: dict[str, Path]) -> str:
    """sha256 of the spec with the library's defaults applied and its roots made portable."""
    full = TrainSpec.model_validate(spec).model_dump(mode="json")
    for (*parents, name), default in LATER_OPTIONS.items():
        owner = full
        for part in parents:
            owner = owner[part]
        if owner[name] == default:
            del owner[name]
            if not owner and parents:  # a block whose options are all later ones, all unset
                _drop_empty(full, parents)
    portable = _portable(full, roots)
    return hashlib.sha256(json.dumps(portable, sort_keys=True).encode()).hexdigest()


def slug(name: str) -> str:
    """A row or stage name as a folder name: `hmkd: deep query` -> `hmkd_deep_query`."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def record_path(preset: str, row: str, seed: int | None, results: Path = RESULTS) -> Path:
    leaf = f"seed{seed}.json" if seed is not None else "run.json"
    return results / preset / slug(row) / leaf


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def curve_summary(run: dict[str, Any]) -> dict[str, Any]:
    """What the plots and the plateau check need of a run's curves, and no more."""
    det = run["curve_det_loss"]
    tail = det[-max(1, len(det) // 10) :] if det else []
    return {
        "eval_iter": run["eval_iter"],
        "eval_ap_s": run["eval_ap_s"],
        "eval_ap": run["eval_ap"],
        "final_det_loss": sum(tail) / len(tail) if tail else None,
    }


def write_record(
    path: Path,
    *,
    preset: str,
    row: str,
    seed: int | None,
    hash_: str,
    run: dict[str, Any],
    spec: dict[str, Any],
    roots: dict[str, Path],
    inputs: dict[str, str],
) -> dict[str, Any]:
    """Write one finished run's record; `inputs` names the sha256 of the weights it read."""
    record = {
        "preset": preset,
        "row": row,
        "seed": seed,
        "spec_hash": hash_,
        "metrics": run["metrics"],
        "tune_metrics": run.get("tune_metrics"),
        "curves": curve_summary(run),
        "cost": {
            "wall_s": run["wall_s"],
            "images_per_s": run["images_per_s"],
            "peak_rss_mib": run["peak_rss_mib"],
            "cuda_peak_mib": run["cuda_peak_mib"],
        },
        "inputs": inputs,
        "machine": run.get("machine"),
        "spec": _portable(spec, roots),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def read_record(
    path: Path, hash_: str | None = None, inputs: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """The record at `path`, or None when there is none, or it is of another spec, or it read
    other weights than `inputs` (a teacher or base retrained elsewhere: its rows are no longer
    paired with runs from the new one, so they run again)."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if hash_ is not None and record.get("spec_hash") != hash_:
        return None
    if inputs is not None and record.get("inputs") != inputs:
        return None
    return record
