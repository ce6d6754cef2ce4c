"""The order queued jobs start in: fair share between teams, priority within a team.

One function, `start_order`, decides it; `claim_next` starts jobs in that order and
`queue_position` / `queued_order` show it, so the place a user sees is the place the job has.

Fair share is weighted fair queueing over GPUs. Each team has a share (`teams.share`,
default 1). Its usage is the GPUs its jobs hold now, over every queue (a CPU job counts as one);
the line is built by repeatedly giving the next place to the team whose usage, plus what it
already has in the line, is smallest relative to its share, and that team's best job takes it
(highest priority, then oldest). So two teams of equal share alternate, a 3:1 pair runs three
GPUs to one, and a flood of one team's jobs does not stand in front of another team's first.
A user's `priority` orders only their own team's jobs.
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.db import db_clock
from jobs.models import Job, JobState, Team


def demand(gpus: int, nodes: int = 1) -> int:
    """What a job weighs against its team's share: its GPUs on every node, a CPU node one."""
    return max(int(gpus or 0), 1) * max(int(nodes or 1), 1)


def running_usage(session: Session, now: datetime | None = None) -> dict[int, int]:
    """GPUs (CPU jobs as one) each team's live jobs hold now, over every queue."""
    now = now or db_clock(session)
    usage: dict[int, int] = defaultdict(int)
    for team_id, gpus, nodes in session.execute(
        select(Job.team_id, Job.gpus, Job.nodes).where(
            Job.state == JobState.running.value, Job.lease_expires_at >= now
        )
    ):
        usage[team_id] += demand(gpus, nodes)
    return dict(usage)


def shares(session: Session, team_ids: set[int]) -> dict[int, float]:
    if not team_ids:
        return {}
    return {
        tid: float(share) if share and share > 0 else 1.0
        for tid, share in session.execute(
            select(Team.id, Team.share).where(Team.id.in_(team_ids))
        ).all()
    }


def start_order(
    session: Session,
    queues: Sequence[str],
    *,
    exclude_teams: set[int] | None = None,
    max_gpus: int | None = None,
    now: datetime | None = None,
) -> dict[str, list[str]]:
    """Per queue, the ids of its queued jobs in the order they start.

    `exclude_teams`: teams left out (at their cap or quota). `max_gpus`: only jobs a worker
    with that many GPUs can hold (a bigger job waits for a bigger worker)."""
    if not queues:
        return {}
    query = (
        select(Job.id, Job.queue, Job.team_id, Job.gpus, Job.nodes)
        .where(Job.state == JobState.queued.value, Job.queue.in_(set(queues)))
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
    )
    if exclude_teams:
        query = query.where(Job.team_id.not_in(exclude_teams))
    if max_gpus is not None:
        query = query.where(Job.gpus <= max_gpus)
    rows = session.execute(query).all()
    if not rows:
        return {q: [] for q in queues}
    usage = running_usage(session, now)
    weight = shares(session, {r.team_id for r in rows})
    order: dict[str, list[str]] = {q: [] for q in queues}
    by_queue: dict[str, dict[int, deque[tuple[str, int]]]] = defaultdict(lambda: defaultdict(deque))
    for r in rows:  # already by priority, then age: each team's deque is its own order
        by_queue[r.queue][r.team_id].append((r.id, demand(r.gpus, r.nodes)))
    for queue, teams in by_queue.items():
        lined = dict(usage)
        # (usage / share, team id): the team with the least use of its share goes next
        heap = [(lined.get(t, 0) / weight.get(t, 1.0), t) for t in teams]
        heapq.heapify(heap)
        line = order[queue]
        while heap:
            _, team = heapq.heappop(heap)
            job_id, weight_of_job = teams[team].popleft()
            line.append(job_id)
            lined[team] = lined.get(team, 0) + weight_of_job
            if teams[team]:
                heapq.heappush(heap, (lined[team] / weight.get(team, 1.0), team))
    return order


def queued_order(session: Session, queues: Sequence[str]) -> dict[str, int]:
    """Job id -> 1-based position among the queued jobs of its queue: `start_order`'s."""
    positions: dict[str, int] = {}
    for line in start_order(session, list(set(queues))).values():
        positions.update({job_id: i + 1 for i, job_id in enumerate(line)})
    return positions


def serving_workers(session: Session, queue: str, *, since: datetime) -> dict[str, int]:
    """Name -> GPUs of each worker whose heartbeat after `since` says it serves `queue`."""
    from jobs.models import Worker

    return {
        name: len(gpus or [])
        for name, queues, gpus in session.execute(
            select(Worker.name, Worker.queues, Worker.gpus).where(Worker.heartbeat_at >= since)
        )
        if queue in (queues or [])
    }


def largest_worker(session: Session, queue: str, *, since: datetime) -> int | None:
    """The most GPUs one worker serving `queue` has; None when no worker serves it (yet)."""
    return max(serving_workers(session, queue, since=since).values(), default=None)


def preemption_victim(
    session: Session, queue: str, *, worker_slots: int, now: datetime | None = None
) -> tuple[str, str] | None:
    """(job id, reason) of the running job of `queue` to preempt for fair share, or None.

    Only when the queue is full (as many live jobs as `worker_slots`, the workers serving it)
    and the job first in line belongs to a team using less of its share than the team using
    the most of its own would after giving one job back: that team's most recently started
    job in the queue checkpoints and yields. One preemption at a time per queue, so a
    released worker is taken before the next is asked for."""
    now = now or db_clock(session)
    live = session.execute(
        select(
            Job.id,
            Job.team_id,
            Job.gpus,
            Job.nodes,
            Job.started_at,
            Job.preempt_requested,
            Job.lease_owner,
        ).where(
            Job.queue == queue,
            Job.state == JobState.running.value,
            Job.lease_expires_at >= now,
        )
    ).all()
    if worker_slots <= 0 or len(live) < worker_slots or any(r.preempt_requested for r in live):
        return None
    line = start_order(session, [queue], now=now)[queue]
    singles = set(session.scalars(select(Job.id).where(Job.id.in_(line), Job.nodes == 1)))
    # a gang waits for free workers (one preempted job would not seat it): the first job
    # behind it that one worker can run is the one preemption makes room for
    line = [job_id for job_id in line if job_id in singles]
    if not line:
        return None
    head = session.execute(select(Job.team_id, Job.gpus).where(Job.id == line[0])).one()
    usage = running_usage(session, now)
    weight = shares(session, {head.team_id, *(r.team_id for r in live)})

    def share_of(team: int, extra: int = 0) -> float:
        return (usage.get(team, 0) + extra) / weight.get(team, 1.0)

    over = max({r.team_id for r in live}, key=lambda t: share_of(t))
    if over == head.team_id:
        return None
    # only a job whose worker can then take the head job: freeing one that cannot would
    # hand the worker straight back to its own team, and preempt it again next sweep
    room = _worker_gpus(session)
    victims = sorted(
        (
            r
            for r in live
            if r.team_id == over
            and r.nodes == 1
            and room.get(str(r.lease_owner or "").split("#")[0], -1) >= head.gpus
        ),
        key=lambda r: r.started_at,
        reverse=True,
    )
    if not victims:
        return None
    victim = victims[0]
    if share_of(over, -demand(victim.gpus)) < share_of(head.team_id, demand(head.gpus)):
        return None  # the swap would leave the other team further over its share
    return (
        victim.id,
        f"fair share: queue {queue} is full and job {line[0]}'s team is under its share",
    )


def _worker_gpus(session: Session) -> dict[str, int]:
    from jobs.models import Worker

    return {
        name: len(gpus or []) for name, gpus in session.execute(select(Worker.name, Worker.gpus))
    }


def workers_serving(session: Session, queue: str, *, since: datetime) -> int:
    """Workers (one job each) whose heartbeat after `since` says they serve `queue`."""
    return len(serving_workers(session, queue, since=since))


def preempt_for_fair_share(
    session: Session, queues: Sequence[str], *, heartbeat_s: float
) -> list[str]:
    """Ask, per full queue, the job fair share says should yield to checkpoint and requeue
    (`preemption_victim`); returns the ids asked. What the workers' sweeper runs."""
    from datetime import timedelta

    from jobs.lifecycle import Conflict, request_preemption

    now = db_clock(session)
    since = now - timedelta(seconds=heartbeat_s)
    asked = []
    for queue in queues:
        found = preemption_victim(
            session, queue, worker_slots=workers_serving(session, queue, since=since), now=now
        )
        if found is None:
            continue
        job_id, reason = found
        job = session.get(Job, job_id)
        try:
            request_preemption(session, job, reason)
        except Conflict:
            continue
        asked.append(job_id)
    return asked
