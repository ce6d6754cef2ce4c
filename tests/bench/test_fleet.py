"""The fleet simulation on SQLite and PostgreSQL: the real admission code under crashes and
preemption loses no job and runs none twice, and a team's larger share buys more GPU-hours."""

from __future__ import annotations

from pathlib import Path

from bench.fleet import render, simulate


def test_a_small_fleet_loses_nothing_and_follows_the_shares(
    empty_db_url: str, tmp_path: Path
) -> None:
    outcome = simulate(
        empty_db_url,
        tmp_path,
        teams={"alpha": 1.0, "beta": 1.0, "gamma": 3.0},
        workers=4,
        jobs=48,
        hours=4,
        tick_s=600,
        crash_per_worker_hour=0.2,
        seed=1,
    )
    assert (outcome.lost, outcome.run_twice, outcome.unfinished) == (0, 0, 0)
    assert outcome.crashes > 0  # the crash path ran
    hours = {team: t["gpu_hours"] for team, t in outcome.teams.items()}
    assert sum(t["jobs"] for t in outcome.teams.values()) == 48
    # with every team backlogged early, the 3-share team is served ahead of the 1-share ones
    waits = {team: t["wait_p50_h"] for team, t in outcome.teams.items()}
    assert waits["gamma"] < waits["beta"], (waits, hours)
    contended = {team: t["contended_pct"] for team, t in outcome.teams.items()}
    assert contended["gamma"] > contended["beta"], contended
    assert "| gamma | 3 (60 %) |" in render(outcome, "python -m bench.fleet")
