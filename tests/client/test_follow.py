"""`follow` off a terminal: the lines a log keeps (a bar redrawn in place leaves nothing)."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from client.follow import follow
from client.sdk import Event


class Replay:
    """The two calls `follow` makes, answered from a recorded job's events."""

    def __init__(self, jobs: list[dict[str, Any]], evaluation: dict[str, Any]) -> None:
        self.jobs, self.evaluation = jobs, evaluation

    def job(self, job_id: str) -> dict[str, Any]:
        return self.jobs[-1] if self.calls else self.jobs[0]

    def events(self, job_id: str) -> Any:
        self.calls = True
        for job in self.jobs[1:]:
            if job["iteration"] == 50:
                yield Event("evaluation", self.evaluation)
            yield Event("progress", job)

    calls = False


def _job(state: str, iteration: int) -> dict[str, Any]:
    return {
        "name": "teacher",
        "state": state,
        "queue": "default",
        "queue_position": 1 if state == "queued" else None,
        "iteration": iteration,
        "total_iterations": 100,
        "attempt": 1,
        "losses": {"loss": 0.5} if iteration else {},
        "images_per_s": 4.0 if iteration else None,
        "eta_s": 30.0 if state == "running" else None,
        "cancel_requested": False,
    }


def test_off_a_terminal_progress_is_lines_per_tenth_state_and_evaluation() -> None:
    jobs = [_job("queued", 0), _job("running", 0)]
    jobs += [_job("running", i) for i in range(1, 101)] + [_job("succeeded", 100)]
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    last = follow(
        Replay(jobs, {"iteration": 50, "metrics": {"AP": 0.5, "AP_S": 0.25}}), "j", console
    )
    lines = out.getvalue().splitlines()
    assert last["state"] == "succeeded"
    assert lines[0] == "teacher  0/100  queued  #1 in default"
    assert "teacher  10/100  running  loss 0.500  4.0 img/s  ETA 30 s" in lines
    assert "eval @ 50: AP 50.0  AP_S 25.0  AP50 n/a" in lines
    assert lines[-1] == "teacher  100/100  succeeded  loss 0.500  4.0 img/s"
    assert 12 <= len(lines) <= 15  # a tenth at a time, not one line per iteration
