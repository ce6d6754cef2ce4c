"""One process of a multi-node job, as torchrun starts it on every node:
`python -m worker.rank REQUEST.json`.

torchrun's c10d rendezvous numbers nodes in an order of its own (by address and process id);
this process renumbers itself by the node the service gave it (`request.node_rank`, 0 on the
worker holding the lease), then joins the process group with env://. The group's store is
served by torchrun's agent, not by a rank, so any numbering works, and global rank 0 (which
alone writes checkpoints, artifacts and the result) runs on node 0, whose worker reads the
result and registers the files.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

from worker.child import (
    TrainRequest,
    check_gpus,
    outcome_of,
    reporter_for,
    setup_logging,
    write_result,
)


def global_rank(node_rank: int, local_rank: int, per_node: int) -> int:
    """Ranks by node, node 0's first: node k's local rank j is k * per_node + j."""
    return node_rank * per_node + local_rank


def run(request: TrainRequest) -> dict[str, Any]:
    from hmkd_core.engine.run import run_rank
    from jobs.schemas import JobSpec

    local_rank = int(os.environ["LOCAL_RANK"])
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    world_size = int(os.environ["WORLD_SIZE"])
    rank = global_rank(request.node_rank, local_rank, per_node)
    os.environ["RANK"] = str(rank)
    spec = JobSpec.model_validate(request.spec)
    check_gpus(spec.resources.gpus)
    train_spec = spec.train_spec()
    train_spec = train_spec.model_copy(
        update={"runtime": train_spec.runtime.model_copy(update={"nproc": per_node})}
    )
    reporter = reporter_for(request, spec)
    run_dir = Path(request.run_dir)
    if rank == 0:
        import yaml

        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "result.json").unlink(missing_ok=True)
        (run_dir / "spec.yaml").write_text(
            yaml.safe_dump(train_spec.model_dump(mode="json"), sort_keys=False)
        )
    run_rank(
        rank,
        world_size,
        "env://",
        train_spec,
        run_dir,
        reporter,
        request.checkpoint_dir,
        request.resume_from,
        local_rank=local_rank,
    )
    if rank != 0:
        return {"status": "succeeded"}
    import json

    done = json.loads((run_dir / "result.json").read_text())
    reporter.on_end(done["status"])
    return {"status": done["status"], "iteration": done["iteration"], "stop": reporter.stop_reason}


def die_with_the_node(supervisor_pid: int) -> None:
    """End this process when its node goes: torchrun starts ranks in sessions of their own,
    so a worker killed with its process group (a crash, `kill -9`, a container stopped)
    would leave them training, and holding the group, as orphans. Linux kills the process
    when torchrun dies (PR_SET_PDEATHSIG); a thread also watches the worker that owns it."""
    import ctypes
    import threading
    import time

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # torchrun died before the line above: already an orphan
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(supervisor_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass

    threading.Thread(target=watch, name="node-watch", daemon=True).start()


def main(path: str) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging()
    request = TrainRequest.from_json(Path(path).read_text())
    die_with_the_node(request.supervisor_pid)
    result = outcome_of(run, request)
    if request.node_rank == 0 and os.environ.get("LOCAL_RANK") == "0":
        write_result(request, result)  # what node 0's worker reads
    return 1 if result["status"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
