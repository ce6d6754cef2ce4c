"""Showing jobs on a terminal: a live progress bar fed by the server-sent events, and tables.

Kept apart from the commands so that `submit --follow` and a future `hmkd follow` draw the same
thing, and so that the SDK stays free of rich.
"""

from __future__ import annotations

import math
import time
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from client.sdk import Client


def pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f}"


def eval_line(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "no evaluation"
    return (
        f"AP {pct(metrics.get('AP'))}  AP_S {pct(metrics.get('AP_S'))}  "
        f"AP50 {pct(metrics.get('AP50'))}"
    )


def _info(job: dict[str, Any]) -> str:
    parts = [job["state"]]
    if job["state"] == "queued" and job.get("queue_position"):
        parts.append(f"#{job['queue_position']} in {job['queue']}")
    if job["state"] == "waiting" and job.get("teacher_job_id"):
        parts.append(f"for teacher job {job['teacher_job_id']}")
    if job.get("attempt", 0) > 1:
        parts.append(f"attempt {job['attempt']}")
    losses = job.get("losses") or {}
    total = losses.get("loss") if "loss" in losses else None
    if total is None and losses:
        total = sum(v for v in losses.values() if isinstance(v, int | float))
    if total is not None:
        parts.append(f"loss {total:.3f}")
    if job.get("images_per_s"):
        parts.append(f"{job['images_per_s']:.1f} img/s")
    if job.get("cancel_requested") and job["state"] == "running":
        parts.append("stopping")
    return "  ".join(parts)


# Off a terminal (a log file, CI, a pipe) a line is printed at each change of state, each
# evaluation, each tenth of the run, and at least this often while running.
LINE_EVERY_S = 60.0


def follow(client: Client, job_id: str, console: Console) -> dict[str, Any]:
    """Show the job's progress until it is final: a live bar on a terminal, lines elsewhere
    (a bar redrawn in place writes nothing a log keeps); returns its last state."""
    if not console.is_terminal:
        return follow_lines(client, job_id, console)
    job = client.job(job_id)
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
    )
    with bar:
        task = bar.add_task(
            escape(job["name"][:30]), total=job["total_iterations"] or None, info=_info(job)
        )
        for event in client.events(job_id):
            if event.event == "evaluation":
                data = event.data
                bar.console.print(
                    f"[cyan]eval @ {data['iteration']}[/]: {eval_line(data['metrics'])}"
                )
                continue
            job = event.data
            bar.update(
                task,
                completed=job["iteration"],
                total=job["total_iterations"] or None,
                info=_info(job),
            )
    return client.job(job_id)


def follow_lines(client: Client, job_id: str, console: Console) -> dict[str, Any]:
    """`follow` for logs: one plain line per change worth keeping."""
    job = client.job(job_id)
    last: tuple[str, int] | None = None
    printed = -math.inf

    def line(job: dict[str, Any]) -> None:
        nonlocal last, printed
        total = job["total_iterations"] or 0
        tenth = 10 * job["iteration"] // total if total else 0
        key = (job["state"], tenth)
        if key == last and time.monotonic() - printed < LINE_EVERY_S:
            return
        last, printed = key, time.monotonic()
        eta = (
            f"  ETA {job['eta_s']:.0f} s" if job.get("eta_s") and job["state"] == "running" else ""
        )
        console.print(
            escape(f"{job['name'][:30]}  {job['iteration']}/{total}  {_info(job)}{eta}"),
            highlight=False,
        )

    line(job)
    for event in client.events(job_id):
        if event.event == "evaluation":
            data = event.data
            console.print(f"eval @ {data['iteration']}: {eval_line(data['metrics'])}")
        else:
            line(event.data)
    return client.job(job_id)


def jobs_table(items: list[dict[str, Any]]) -> Table:
    """Narrow on purpose: the whole id (other commands take it) fits an 80-column terminal."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("id", no_wrap=True, min_width=32)
    table.add_column("name", overflow="fold", ratio=1)
    for column in ("kind", "state", "done", "AP_S"):
        table.add_column(column, no_wrap=True)
    for job in items:
        best = job.get("best_eval") or job.get("latest_eval") or {}
        table.add_row(
            job["id"],
            escape(job["name"]),
            job["kind"],
            job["state"] + (f" #{job['queue_position']}" if job.get("queue_position") else ""),
            f"{job['progress']:.0f}%",
            pct(best.get("AP_S")) if best else "",
        )
    return table


def _seconds(value: float) -> str:
    value = int(value)
    hours, rest = divmod(value, 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def _run_time(job: dict[str, Any]) -> str:
    """From the first start to the end (or now): what the job has cost in wall time."""
    from datetime import UTC, datetime

    if not job.get("started_at"):
        return ""
    start = datetime.fromisoformat(job["started_at"])
    end = datetime.fromisoformat(job["finished_at"]) if job.get("finished_at") else None
    spent = ((end or datetime.now(UTC)) - start).total_seconds()
    return _seconds(max(0.0, spent)) + ("" if end else " so far")


def per_category_line(metrics: dict[str, Any] | None) -> str:
    per = (metrics or {}).get("per_category") or {}
    return "  ".join(f"{name} {pct(value)}" for name, value in per.items())


def status_table(job: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    eta = job.get("eta_s")
    final = job.get("best_eval") or job.get("latest_eval")
    waits = job["state"] == "waiting" and job.get("teacher_job_id")
    rows = [
        ("id", job["id"]),
        ("name", f"{job['name']} ({job['kind']}, {job['method']})"),
        (
            "state",
            job["state"]
            + (" (cancel requested)" if job["cancel_requested"] else "")
            + (f" for teacher job {job['teacher_job_id']}" if waits else ""),
        ),
        ("teacher job", job.get("teacher_job_id") or ""),
        ("run time", _run_time(job)),
        ("attempt", f"{job['attempt']} of {job['max_attempts']}"),
        ("queue", job["queue"] + (f", position {p}" if (p := job.get("queue_position")) else "")),
        ("progress", f"{job['progress']:.1f}% ({job['iteration']}/{job['total_iterations']})"),
        ("ETA", "" if eta is None else f"{eta:.0f} s"),
        ("images/s", "" if job.get("images_per_s") is None else f"{job['images_per_s']:.1f}"),
        ("lr", "" if job.get("lr") is None else f"{job['lr']:.2e}"),
        ("losses", "  ".join(f"{k} {v:.4f}" for k, v in (job.get("losses") or {}).items() if v)),
        ("latest eval", eval_line(job.get("latest_eval")) if job.get("latest_eval") else ""),
        ("best eval", eval_line(job.get("best_eval")) if job.get("best_eval") else ""),
        ("AP per category", per_category_line(final)),
        ("error", job.get("error") or ""),
        ("created", job["created_at"]),
        ("finished", job.get("finished_at") or ""),
    ]
    for key, value in rows:
        if value:
            table.add_row(key, escape(str(value)))
    return table


def queue_tables(overview: dict[str, Any]) -> tuple[Table, Table]:
    used = overview.get("team_disk_bytes", 0) / 2**20
    queues = Table(title="queues", caption=f"your team's jobs keep {used:.1f} MiB of artifacts")
    for column in ("queue", "queued", "running", "your queued jobs (position)"):
        queues.add_column(column, overflow="fold")
    for q in overview["queues"]:
        mine = ", ".join(f"#{j['position']} {j['id'][:8]} {j['name']}" for j in q["jobs"])
        queues.add_row(escape(q["name"]), str(q["queued"]), str(q["running"]), escape(mine))
    workers = Table(title="workers")
    for column in ("worker", "queues", "GPUs", "job", "heartbeat"):
        workers.add_column(column, overflow="fold")
    for w in overview["workers"]:
        gpus = ", ".join(
            str(g.get("name", g)) if isinstance(g, dict) else str(g) for g in w["gpus"]
        )
        workers.add_row(
            escape(w["name"]),
            escape(", ".join(map(str, w["queues"]))),
            escape(gpus) or "CPU",
            w.get("current_job_id") or "",
            f"{w['heartbeat_age_s']:.0f} s ago",
        )
    return queues, workers
