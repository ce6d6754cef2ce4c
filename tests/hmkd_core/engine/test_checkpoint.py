"""Checkpoints: atomic writes, safe loading, pruning, and RNG state that makes resume exact."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hmkd_core.engine.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_atomic,
)


class Unpicklable:
    """Stands in for a write that dies half-way: pickling it raises after torch.save began."""

    def __reduce__(self):
        raise RuntimeError("simulated crash while writing")


def training_state() -> dict:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()  # fills the momentum buffers
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "iteration": 7,
        "rng": capture_rng_state(),
    }


def test_round_trip_with_weights_only(tmp_path: Path) -> None:
    state = training_state()
    path = tmp_path / "ckpt.pt"
    save_atomic(state, path)
    loaded = load_checkpoint(path)

    assert loaded["iteration"] == 7
    for key, tensor in state["model"].items():
        assert torch.equal(loaded["model"][key], tensor), key
    momentum = state["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], momentum)
    assert loaded["rng"]["python"] == state["rng"]["python"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


def test_restored_rng_repeats_draws(tmp_path: Path) -> None:
    save_atomic({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    first = (torch.rand(3), random.random(), np.random.rand())
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    second = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], second[0])
    assert first[1:] == second[1:]


def test_restore_refuses_foreign_state() -> None:
    with pytest.raises(CheckpointError, match="capture_rng_state"):
        restore_rng_state({"seed": 0})


def test_failed_save_leaves_previous_file_intact(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_atomic({"iteration": 1}, path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_atomic({"iteration": 2, "bad": Unpicklable()}, path)
    assert load_checkpoint(path) == {"iteration": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pt does not exist.*without resume"):
        load_checkpoint(tmp_path / "nope.pt")


def test_corrupt_file_raises_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_atomic({"weights": torch.ones(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated, as after a crash without atomicity
    with pytest.raises(CheckpointError, match=r"ckpt\.pt is unreadable.*Delete it"):
        load_checkpoint(path)

    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)


def test_code_carrying_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"model": nn.Linear(2, 2)}, path)  # a pickled module, not a state_dict
    with pytest.raises(CheckpointError, match="state_dicts only"):
        load_checkpoint(path)


def test_manager_prunes_to_keep_and_finds_latest(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "checkpoints", keep=2)
    assert manager.latest() is None
    for iteration in (100, 200, 300, 400):
        manager.save({"iteration": iteration}, iteration)
    best = manager.save_named({"iteration": 200}, "best")
    (tmp_path / "checkpoints" / ".ckpt_00000500.pt.abc.tmp").write_bytes(b"")  # stray temp

    names = sorted(p.name for p in manager.periodic())
    assert names == ["ckpt_00000300.pt", "ckpt_00000400.pt"]
    assert manager.latest() == tmp_path / "checkpoints" / "ckpt_00000400.pt"
    assert load_checkpoint(manager.latest())["iteration"] == 400
    assert best.name == "best.pt" and best.exists()

    manager.save({"iteration": 500}, 500)
    assert best.exists()  # named checkpoints are never pruned


def test_manager_orders_by_iteration_not_name_length(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save({}, 99_999_999)
    manager.save({}, 100_000_000)  # nine digits sorts before eight as a string
    assert manager.latest() == tmp_path / "ckpt_100000000.pt"


def test_manager_rejects_bad_names(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=1)
    with pytest.raises(ValueError, match="periodic"):
        manager.save_named({}, "ckpt_00000001")
    with pytest.raises(ValueError, match="plain file name"):
        manager.save_named({}, "../best")
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, keep=0)
