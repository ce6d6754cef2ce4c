"""A GPU fleet simulated against the real admission code: fair share, quotas, preemption and
worker crashes, on a scratch SQLite (or PostgreSQL) database.

Workers and training are simulated on a clock of their own; every decision is the service's:
jobs enter through `submit_job`, start through `claim_next` (fair-share order, GPU fit, caps
and quotas), keep their leases through `renew_lease`, come back from crashed workers through
`requeue_expired`, yield through `preemption_victim` + `request_preemption` + `release_job`, and
end through `finish_job`. It prints each team's GPU-hours against its share, queue-wait
percentiles per team, preemptions, and jobs lost or run twice (both must be 0).

    python -m bench.fleet                        # 3 teams, 50 workers of 8 GPUs, 2,000 jobs
    python -m bench.fleet --out docs/fleet.md    # and write the page
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import func, select


@dataclass
class SimJob:
    id: str
    team: str
    gpus: int
    work_s: float  # simulated seconds of training the job needs
    submit_at: float
    done_s: float = 0.0  # progress, kept across preemptions (it checkpoints) and lost on a
    checkpoint_s: float = 0.0  # crash back to the last periodic checkpoint
    started_at: float | None = None


@dataclass
class SimWorker:
    name: str
    incarnation: int = 0
    job: SimJob | None = None
    attempt: int = 0
    down_until: float = -1.0  # crashed: no heartbeat, no work, until then
    releasing: bool = False  # asked to yield: checkpoints and releases on its next tick

    @property
    def owner(self) -> str:
        return f"{self.name}#{self.incarnation}"


@dataclass
class Outcome:
    teams: dict[str, dict[str, Any]] = field(default_factory=dict)
    preemptions: int = 0
    crashes: int = 0
    lost: int = 0
    run_twice: int = 0
    unfinished: int = 0
    sim_hours: float = 0.0
    wall_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)


def _dataset(root: Path, images: int = 16) -> dict[str, Any]:
    """One tiny COCO split on disk: submit_job checks the data a spec names, each image's
    header included, and that every process of a job (up to 8 GPUs here) gets a whole batch
    (the default 2) of its images."""
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, images + 1):
        Image.new("L", (64, 64)).save(folder / f"{i}.png")
    coco = {
        "images": [
            {"id": i, "file_name": f"{i}.png", "width": 64, "height": 64}
            for i in range(1, images + 1)
        ],
        "annotations": [
            {"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 8, 8]}
            for i in range(1, images + 1)
        ],
        "categories": [{"id": 1, "name": "object"}],
    }
    (root / "a.json").write_text(json.dumps(coco))
    return {"train": {"images": str(folder), "annotations": str(root / "a.json")}}


def simulate(
    database_url: str,
    data_dir: Path,
    *,
    teams: dict[str, float],
    workers: int = 50,
    gpus_per_worker: int = 8,
    jobs: int = 2000,
    hours: float = 48.0,
    tick_s: float = 300.0,
    crash_per_worker_hour: float = 0.01,
    lease_s: float = 900.0,
    seed: int = 0,
) -> Outcome:
    """Run the fleet until every job has ended (or `hours` of arrivals plus a drain)."""
    from jobs import admin as admin_commands
    from jobs.auth import create_user
    from jobs.db import session_scope
    from jobs.lifecycle import (
        claim_next,
        finish_job,
        release_job,
        renew_lease,
        request_preemption,
        requeue_expired,
        submit_job,
    )
    from jobs.migrate import upgrade
    from jobs.models import Job, JobEvent, JobState, User
    from jobs.progress import heartbeat_worker
    from jobs.scheduling import preemption_victim
    from jobs.schemas import JobSpec
    from jobs.settings import Settings

    started_wall = time.monotonic()
    rng = random.Random(seed)
    settings = Settings(
        data_dir=data_dir,
        database_url=database_url,
        dataset_roots=[data_dir / "datasets"],
        max_attempts=5,
    )
    upgrade(database_url)
    data = _dataset(data_dir / "datasets" / "sim")
    users = {}
    with session_scope(database_url) as session:
        for team, share in teams.items():
            user = create_user(session, name=f"user-{team}", team_name=team)
            users[team] = user.id
            admin_commands.change_team(session, team, share=share)

    # arrivals: each team submits a third of the jobs over `hours`, one team in bursts
    plan: list[tuple[float, str, int, float]] = []
    names = list(teams)
    for i in range(jobs):
        team = names[i % len(names)]
        at = rng.uniform(0, hours * 3600) if team != names[0] else rng.uniform(0, hours * 1800)
        gpus = rng.choice([1, 1, 2, 4, 8])
        work = rng.uniform(0.5, 4.0) * 3600
        plan.append((at, team, gpus, work))
    plan.sort()

    t0 = datetime.now().astimezone()
    clock = 0.0
    fleet = [SimWorker(f"gpu-{k:02d}@fleet") for k in range(workers)]
    by_id: dict[str, SimJob] = {}
    gpu_seconds: dict[str, float] = defaultdict(float)
    contended_seconds: dict[str, float] = defaultdict(float)  # while every team had a backlog
    waits: dict[str, list[float]] = defaultdict(list)
    outcome = Outcome()
    gpu_list = [{"index": i, "name": "sim"} for i in range(gpus_per_worker)]
    next_arrival = 0

    def now() -> datetime:
        return t0 + timedelta(seconds=clock)

    # arrivals, then three times the work's length on the whole fleet: ample for a drain
    deadline = hours * 3600 + 3 * sum(work for _, _, _, work in plan) / max(workers, 1)
    while clock < deadline:
        with session_scope(database_url) as session:
            # arrivals, through the real submit path
            while next_arrival < len(plan) and plan[next_arrival][0] <= clock:
                at, team, gpus, work = plan[next_arrival]
                spec = JobSpec.model_validate(
                    {"name": f"{team}-{next_arrival}", "data": data, "student": {},
                     "resources": {"gpus": gpus, "priority": rng.randint(0, 9)}}
                )  # fmt: skip
                user = session.get(User, users[team])
                job, _ = submit_job(session, user=user, spec=spec, settings=settings)
                by_id[job.id] = SimJob(job.id, team, gpus, work, at)
                next_arrival += 1
            # heartbeats of the workers that are up (what preemption counts as slots)
            for w in fleet:
                if w.down_until <= clock:
                    heartbeat_worker(
                        session, name=w.name, queues=["default"], gpus=gpu_list,
                        current_job_id=w.job.id if w.job else None,
                    )  # fmt: skip
        # crashes: the worker and its training vanish; its lease runs out later
        for w in fleet:
            if w.down_until > clock:
                continue
            if w.job is not None and rng.random() < crash_per_worker_hour * tick_s / 3600:
                outcome.crashes += 1
                w.job.done_s = w.job.checkpoint_s  # back to its last periodic checkpoint
                w.job, w.releasing = None, False
                w.down_until = clock + 1800
                w.incarnation += 1
        # training advances; a finished job ends, a job asked to yield releases
        with session_scope(database_url) as session:
            backlogged = set(
                session.scalars(
                    select(Job.team_id).where(Job.state == JobState.queued.value).distinct()
                )
            )
            contended = len(backlogged) == len(teams)  # every team has work waiting
            for w in fleet:
                if w.job is None or w.down_until > clock:
                    continue
                job = w.job
                if w.releasing:
                    job.checkpoint_s = job.done_s
                    if release_job(
                        session, job.id, worker=w.owner, attempt=w.attempt,
                        iteration=int(job.done_s),
                    ):  # fmt: skip
                        outcome.preemptions += 1
                    w.job, w.releasing = None, False
                    continue
                job.done_s = min(job.work_s, job.done_s + tick_s)
                gpu_seconds[job.team] += job.gpus * tick_s
                if contended:
                    contended_seconds[job.team] += job.gpus * tick_s
                if job.done_s - job.checkpoint_s >= 1800:  # a checkpoint every half hour
                    job.checkpoint_s = job.done_s
                if job.done_s >= job.work_s:
                    finish_job(
                        session, job.id, worker=w.owner, attempt=w.attempt,
                        state=JobState.succeeded,
                    )  # fmt: skip
                    w.job = None
                elif not renew_lease(
                    session, job.id, worker=w.owner, attempt=w.attempt, lease_seconds=lease_s,
                    now=now(),
                ):  # fmt: skip
                    w.job = None  # fenced off: another attempt holds it
                else:
                    row = session.get(Job, job.id)
                    if row.preempt_requested:
                        w.releasing = True
            requeue_expired(session, now())
        # free workers take turns: each turn is a delivered message for some queued job
        with session_scope(database_url) as session:
            for w in fleet:
                if w.job is not None or w.down_until > clock:
                    continue
                message = session.scalar(
                    select(Job.id).where(Job.state == JobState.queued.value).limit(1)
                )
                if message is None:
                    break
                claimed = claim_next(
                    session, message, worker=w.owner, lease_seconds=lease_s,
                    worker_gpus=gpus_per_worker, now=now(),
                )  # fmt: skip
                if claimed is None:
                    continue
                job = by_id[claimed.id]
                if job.started_at is None:
                    job.started_at = clock
                    waits[job.team].append(clock - job.submit_at)
                job.done_s = job.checkpoint_s  # resumes from its last checkpoint
                w.job, w.attempt = job, claimed.attempt
            # fair share: a full queue makes the team most over its share yield one job
            slots = sum(1 for w in fleet if w.down_until <= clock)
            found = preemption_victim(session, "default", worker_slots=slots, now=now())
            if found is not None:
                request_preemption(session, session.get(Job, found[0]), found[1], now=now())
        # no job is held by two workers at once
        held = [w.job.id for w in fleet if w.job is not None]
        outcome.run_twice += len(held) - len(set(held))
        clock += tick_s
        if next_arrival >= len(plan) and all(w.job is None for w in fleet):
            with session_scope(database_url) as session:
                left = session.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.state.in_([JobState.queued.value, JobState.running.value]))
                )
            if not left:
                break

    with session_scope(database_url) as session:
        states = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        # a claim that started an attempt while another attempt still held the job
        doubles = session.scalar(
            select(func.count())
            .select_from(JobEvent)
            .where(JobEvent.kind == "claimed")
            .group_by(JobEvent.job_id, JobEvent.attempt)
            .having(func.count() > 1)
        )
    outcome.run_twice += int(doubles or 0)
    outcome.lost = int(states.get("failed", 0))
    outcome.unfinished = int(states.get("queued", 0) + states.get("running", 0))
    total_share = sum(teams.values())
    total_gpu = sum(gpu_seconds.values()) or 1.0
    total_contended = sum(contended_seconds.values()) or 1.0
    for team, share in teams.items():
        w = sorted(waits[team])

        def pct(q: float, w: list[float] = w) -> float:
            return w[min(len(w) - 1, int(q * len(w)))] / 3600 if w else float("nan")

        outcome.teams[team] = {
            "share": share,
            "share_pct": 100 * share / total_share,
            "jobs": sum(1 for j in by_id.values() if j.team == team),
            "gpu_hours": gpu_seconds[team] / 3600,
            "gpu_pct": 100 * gpu_seconds[team] / total_gpu,
            "contended_gpu_hours": contended_seconds[team] / 3600,
            "contended_pct": 100 * contended_seconds[team] / total_contended,
            "wait_p50_h": pct(0.5),
            "wait_p90_h": pct(0.9),
            "wait_p99_h": pct(0.99),
            "wait_mean_h": statistics.fmean(w) / 3600 if w else float("nan"),
        }
    outcome.sim_hours = clock / 3600
    outcome.wall_s = time.monotonic() - started_wall
    outcome.config = {
        "teams": teams, "workers": workers, "gpus_per_worker": gpus_per_worker, "jobs": jobs,
        "arrival_hours": hours, "tick_s": tick_s, "crash_per_worker_hour": crash_per_worker_hour,
        "lease_s": lease_s, "seed": seed,
    }  # fmt: skip
    return outcome


def render(o: Outcome, command: str) -> str:
    c = o.config
    lines = [
        "| team | share | jobs | GPU-hours | of all | GPU-hours while all teams wait | of those "
        "| wait p50 | p90 | p99 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for team, t in o.teams.items():
        lines.append(
            f"| {team} | {t['share']:g} ({t['share_pct']:.0f} %) | {t['jobs']} | "
            f"{t['gpu_hours']:.0f} | {t['gpu_pct']:.1f} % | {t['contended_gpu_hours']:.0f} | "
            f"{t['contended_pct']:.1f} % | {t['wait_p50_h']:.2f} h | "
            f"{t['wait_p90_h']:.2f} h | {t['wait_p99_h']:.2f} h |"
        )
    return "\n".join(
        [
            f"`{command}`: {c['workers']} workers of {c['gpus_per_worker']} GPUs, {c['jobs']} "
            f"jobs of 1-8 GPUs and 0.5-4 h arriving over {c['arrival_hours']:g} h (team "
            f"{next(iter(c['teams']))} submits all of its jobs in the first half), random "
            f"priorities, {c['crash_per_worker_hour']} crashes per busy worker-hour, a "
            f"{c['tick_s']:.0f}-s tick, seed {c['seed']}.",
            "",
            *lines,
            "",
            f"- simulated {o.sim_hours:.1f} h in {o.wall_s:.0f} s of wall time",
            f"- preemptions: {o.preemptions}; worker crashes: {o.crashes}",
            f"- jobs lost (failed): {o.lost}; run twice: {o.run_twice}; left unfinished: "
            f"{o.unfinished}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--database-url", default=None, help="default: a scratch SQLite file")
    p.add_argument("--workers", type=int, default=50)
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--hours", type=float, default=48.0, help="arrivals spread over this")
    p.add_argument("--shares", default="alpha=1,beta=1,gamma=2")
    p.add_argument("--crash-rate", type=float, default=0.01, help="per busy worker-hour")
    p.add_argument("--tick", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the markdown page here")
    args = p.parse_args(argv)
    teams = {k: float(v) for k, v in (kv.split("=") for kv in args.shares.split(","))}
    with tempfile.TemporaryDirectory() as scratch:
        url = args.database_url or f"sqlite:///{scratch}/fleet.db"
        outcome = simulate(
            url, Path(scratch), teams=teams, workers=args.workers, jobs=args.jobs,
            hours=args.hours, tick_s=args.tick, crash_per_worker_hour=args.crash_rate,
            seed=args.seed,
        )  # fmt: skip
    command = "python -m bench.fleet " + " ".join(argv if argv is not None else sys.argv[1:])
    text = render(outcome, command.strip())
    print(text)
    if args.out is not None:
        args.out.write_text(PAGE.format(body=text))
        print(f"wrote {args.out}")
    ok = outcome.lost == 0 and outcome.run_twice == 0 and outcome.unfinished == 0
    return 0 if ok else 1


PAGE = """# The fleet, simulated

`bench/fleet.py` drives the service's own admission code (submit, `claim_next`'s fair-share
line, GPU fit, quotas, leases, `requeue_expired`, preemption, `finish_job`) with simulated
workers and training on a clock of its own, on a scratch SQLite database. Training progress
is kept across a preemption (the job checkpoints before it yields) and falls back to the last
half-hourly checkpoint after a crash; a crashed worker comes back after 30 minutes under a new
name, and its job is requeued when its lease runs out.

{body}

How to read it: over the whole run every team gets the GPU-hours its own jobs need (fair share
is work-conserving: nothing is held back once the queue drains), so the share shows in the
GPU-hours counted *while every team had jobs waiting*, which should split as the shares do, and
in the waits. Jobs lost and run twice must be 0: the command exits 1 otherwise.
"""


if __name__ == "__main__":
    raise SystemExit(main())
