"""Checkpoints that survive a kill at any moment, and RNG state that makes resume exact.

A run can be stopped by a user, a pre-empted node or an OOM while it is writing, so every file
goes to a temporary name in the same directory, is fsynced, then renamed over the target:
readers see the old file or the new one, never half of one. Loading uses
`torch.load(weights_only=True)`, so a checkpoint cannot run code; everything saved here is
therefore plain containers, numbers, strings and tensors (no numpy arrays).
"""

from __future__ import annotations

import logging
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hmkd_core.atomic import atomic_write

logger = logging.getLogger(__name__)

_PERIODIC = re.compile(r"^ckpt_(\d{8,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written; the message names the file and a fix."""


def save_atomic(obj: Any, path: Path) -> None:
    """`torch.save` to `path` so that a crash mid-write leaves any previous file intact."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_atomic`, refusing anything that would run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; check the path, or start the run without resume"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise CheckpointError(
                f"checkpoint {path} holds objects other than tensors and plain containers, so "
                "it was not written by this library; re-export it with state_dicts only"
            ) from err
        raise _corrupt(path, err) from err
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as err:
        raise _corrupt(path, err) from err
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, not a dict; it was not written "
            "by this library"
        )
    return state


def _corrupt(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); it is truncated or "
        "corrupt. Delete it to resume from the previous checkpoint, or start a new run"
    )


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, in a form `weights_only` loading accepts.

    Keys: `python` (random's state tuple), `numpy` (legacy global MT19937: keys as an int64
    tensor plus position and Gaussian cache), `torch` (CPU generator, uint8 tensor), and `cuda`
    (a list of per-device uint8 tensors) only once CUDA is initialised, so that capturing
    never creates a CUDA context in a CPU run.
    """
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what `capture_rng_state` recorded, so the next draws repeat exactly.

    Tensors may come back on a GPU (`map_location="cuda"`); generators need them on the CPU.
    CUDA states are restored for the devices both the capture and this process see.
    """
    missing = {"python", "torch"} - state.keys()
    if missing:
        raise CheckpointError(
            f"RNG state lacks {sorted(missing)}; it was not made by capture_rng_state"
        )
    random.setstate(_as_tuple(state["python"]))
    if "numpy" in state:
        np_state = state["numpy"]
        np.random.set_state(
            (
                np_state["kind"],
                np_state["keys"].cpu().numpy().astype(np.uint32),
                np_state["pos"],
                np_state["has_gauss"],
                np_state["cached_gaussian"],
            )
        )
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if len(cuda_states) != visible:
            logger.warning(
                "RNG state was captured with %d CUDA devices but %d are visible; restoring the "
                "first %d. Resume with the same CUDA_VISIBLE_DEVICES for an exact replay.",
                len(cuda_states),
                visible,
                min(len(cuda_states), visible),
            )
        for device, cuda_state in enumerate(cuda_states[:visible]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


def _as_tuple(value: Any) -> Any:
    """random.setstate wants nested tuples; a round trip through JSON would give lists."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


class CheckpointManager:
    """Periodic `ckpt_{iteration:08d}.pt` files, of which the newest `keep` are kept.

    Named files (`best.pt`) live in the same directory and are never pruned.
    """

    def __init__(self, directory: Path, *, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}; resuming needs a checkpoint")
        self.directory = Path(directory)
        self.keep = keep

    def save(self, state: dict[str, Any], iteration: int) -> Path:
        """Write the checkpoint for `iteration`, then delete periodic ones beyond `keep`."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        path = self.directory / f"ckpt_{iteration:08d}.pt"
        save_atomic(state, path)
        for old in self.periodic()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def save_named(self, state: dict[str, Any], name: str) -> Path:
        """Write `name` (`.pt` added when missing), e.g. `best`; never pruned."""
        filename = name if name.endswith(".pt") else f"{name}.pt"
        if Path(filename).name != filename or filename.startswith("."):
            raise ValueError(f"checkpoint name {name!r} must be a plain file name like 'best'")
        if _PERIODIC.match(filename):
            raise ValueError(
                f"checkpoint name {name!r} looks like a periodic checkpoint and would be pruned; "
                "choose another name"
            )
        path = self.directory / filename
        save_atomic(state, path)
        return path

    def periodic(self) -> list[Path]:
        """Periodic checkpoints, oldest first (by iteration); temp files are not listed."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _PERIODIC.match(path.name)
            if match and path.is_file():
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The periodic checkpoint with the highest iteration, or None before the first."""
        periodic = self.periodic()
        return periodic[-1] if periodic else None
