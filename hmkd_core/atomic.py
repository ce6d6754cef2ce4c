"""Atomic file writes: a reader (or a resumed run) never sees half a file.

Write to a temporary file in the same folder, fsync it, rename it over the target, fsync the
folder. A crash at any point leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path | str, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temporary binary file, then move it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def is_orphan_name(name: str) -> bool:
    """Whether `name` is one of `atomic_write`'s temporary files (`.<target>.<random>.tmp`)."""
    return name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3


def remove_orphans(directory: Path | str, *, older_than_s: float = 0.0) -> list[Path]:
    """Delete the temporary files a killed `atomic_write` left under `directory`, at any
    depth, that are older than `older_than_s`. A process killed mid-save (OOM, SIGKILL, a
    lost node) leaves one as large as the checkpoint it was writing, and nothing else would
    ever remove it. Returns what was removed."""
    import time

    root = Path(directory)
    if not root.is_dir():
        return []
    cutoff = time.time() - older_than_s
    removed = []
    for path in root.rglob(".*.tmp"):
        try:
            if is_orphan_name(path.name) and path.is_file() and path.stat().st_mtime <= cutoff:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # finished or removed meanwhile
            continue
    return removed


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable; not every OS lets a directory be opened, so best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
