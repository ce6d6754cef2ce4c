"""Worker process plumbing that needs no broker: GPU discovery and the worker's arguments."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from worker.celery_app import app, list_gpus
from worker.cli import worker_argv

SMI = """#!/bin/sh
echo "GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-aaaa)"
echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)"
"""


@pytest.fixture
def fake_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An `nvidia-smi` that lists two GPUs, first on PATH (this machine may have none)."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(SMI)
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")


def test_gpus_come_from_nvidia_smi_without_touching_cuda(
    fake_smi: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert list_gpus() == [
        {"index": 0, "name": "NVIDIA A100-SXM4-80GB"},
        {"index": 1, "name": "NVIDIA H100 80GB HBM3"},
    ]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")  # renumbered from 0, as CUDA does
    assert list_gpus() == [{"index": 0, "name": "NVIDIA H100 80GB HBM3"}]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert list_gpus() == []


def test_no_nvidia_smi_means_a_cpu_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert list_gpus() == []


def test_worker_runs_one_job_at_a_time_on_named_queues() -> None:
    argv = worker_argv(["gpu-a100", "gpu-any"], hostname="a100-1@node7")
    assert argv[:3] == ["worker", "-Q", "gpu-a100,gpu-any"]
    joined = " ".join(argv)
    assert "--concurrency 1" in joined and "--pool prefork" in joined and "-O fair" in joined
    assert "--without-gossip" in argv and "--without-mingle" in argv
    assert argv[-2:] == ["--hostname", "a100-1@node7"]
    with pytest.raises(ValueError, match="at least one queue"):
        worker_argv([])


def test_the_app_registers_the_task_by_name() -> None:
    app.loader.import_default_modules()
    assert "hmkd.run_job" in app.tasks
    assert app.conf.task_acks_late and app.conf.worker_prefetch_multiplier == 1


def test_worker_names_are_unique_per_process_unless_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os
    import socket

    from worker.cli import worker_name

    monkeypatch.delenv("HMKD_WORKER_NAME", raising=False)
    host = socket.gethostname()
    assert worker_name() == f"hmkd-{os.getpid()}@{host}"  # two workers on a host differ
    assert worker_name("gpu-a") == f"gpu-a@{host}"
    assert worker_name("gpu-a@node7") == "gpu-a@node7"
    monkeypatch.setenv("HMKD_WORKER_NAME", "rack3-gpu0")
    assert worker_name() == f"rack3-gpu0@{host}"
    for bad in ("a b", "x\x00y", "@host", "a/b"):
        with pytest.raises(ValueError, match="worker name"):
            worker_name(bad)


def test_orphaned_saves_are_removed_from_jobs_that_do_not_run(tmp_path: Path) -> None:
    """A kill during a checkpoint save leaves `.<name>.<random>.tmp`: the run's next start and
    the sweeper remove it; a running job's fresh ones, and other files, stay."""
    import os
    import time

    from hmkd_core.atomic import atomic_write, remove_orphans
    from jobs.db import session_scope
    from jobs.migrate import upgrade
    from jobs.models import Job, JobState, Team, User
    from jobs.settings import Settings
    from worker.celery_app import remove_orphaned_saves

    settings = Settings(data_dir=tmp_path / "data")
    upgrade(settings.database_url)
    root = Path(settings.artifacts_dir)
    with session_scope(settings.database_url) as s:
        team = Team(name="t")
        s.add(team)
        s.flush()
        user = User(name="u", team_id=team.id)
        s.add(user)
        s.flush()
        for job_id, state in (("a" * 32, JobState.failed), ("b" * 32, JobState.running)):
            s.add(
                Job(
                    id=job_id,
                    team_id=team.id,
                    user_id=user.id,
                    name="j",
                    kind="train",
                    method="none",
                    queue="default",
                    spec={},
                    state=state.value,
                )
            )
    old = time.time() - 7200
    planted = {}
    for job_id in ("a" * 32, "b" * 32):
        ckpts = root / job_id / "run" / "checkpoints"
        atomic_write(ckpts / "ckpt_00000010.pt", lambda f: f.write(b"done"))
        orphan = ckpts / ".ckpt_00000020.pt.k3j2h1.tmp"
        orphan.write_bytes(b"half a checkpoint")
        os.utime(orphan, (old, old))
        planted[job_id] = orphan
    removed = remove_orphaned_saves(settings, older_than_s=3600)
    assert removed == [planted["a" * 32]]  # the running job's is left to its own process
    assert planted["b" * 32].exists()
    assert (root / ("a" * 32) / "run" / "checkpoints" / "ckpt_00000010.pt").read_bytes() == b"done"
    # the run's own start removes them at any age
    fresh = root / ("b" * 32) / "run" / ".student.pt.x1y2.tmp"
    fresh.write_bytes(b"x")
    assert sorted(remove_orphans(root / ("b" * 32))) == sorted([planted["b" * 32], fresh])
