"""Confining user-given paths to the configured roots.

A job spec names dataset folders and weight files on the server's disk; without a check, any
user could make a worker read any file it can (and learn from the errors whether it exists). A
path is judged after resolving symlinks and `..`, so a link inside a root that points outside is
refused too, and a path outside every root is refused before its existence is looked at.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


class PathNotAllowed(ValueError):
    """A path outside the allowed roots, or missing; `field` is the spec's dotted field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def confine(
    path: Path | str, roots: Sequence[Path | str], *, field: str, must_exist: bool = True
) -> Path:
    """The resolved `path` if it lies under one of `roots` (and exists, unless told otherwise)."""
    text = os.fspath(path)
    if "\x00" in text:
        raise PathNotAllowed(field, f"{text!r} holds a NUL byte")
    given = Path(text)
    if not given.is_absolute():
        raise PathNotAllowed(
            field,
            f"{text} is a relative path; give an absolute path under the dataset roots "
            f"{_show(roots)}",
        )
    try:
        resolved = given.resolve()
        resolved_roots = [Path(root).expanduser().resolve() for root in roots]
        if not any(resolved.is_relative_to(root) for root in resolved_roots):
            via = "" if resolved == given else f" (it resolves to {resolved})"
            raise PathNotAllowed(
                field,
                f"{text} is outside the dataset roots {_show(resolved_roots)}{via}; copy or move "
                "the data under a root (a symlink to it is not enough), or ask the admin to add "
                "a root (HMKD_DATASET_ROOTS)",
            )
        if must_exist and not resolved.exists():
            raise PathNotAllowed(field, f"{text} does not exist")
        if resolved.exists() and not (resolved.is_file() or resolved.is_dir()):
            # a FIFO or a device: opening it to read the spec's data would block the request
            raise PathNotAllowed(field, f"{text} is not a regular file or folder")
    except (OSError, RuntimeError) as err:
        # a name too long for the file system, or a symlink loop (which resolve() raises as a
        # RuntimeError before Python 3.13)
        reason = getattr(err, "strerror", None) or "symlink loop"
        raise PathNotAllowed(field, f"{text} cannot be resolved: {reason}") from None
    return resolved


def _show(roots: Sequence[Path | str]) -> str:
    return "[" + ", ".join(str(root) for root in roots) + "]"
