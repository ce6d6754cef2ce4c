"""The artifact store: one folder per job under the artifacts root.

    <root>/<job_id>/run/        the hmkd_core run dir (student.pt, eval.json, metrics.jsonl, ...)
    <root>/<job_id>/run/checkpoints/attempt-<k>/   the checkpoints attempt k wrote
    <root>/<job_id>/logs.txt    the worker's log of the job

Artifact names are paths relative to the job's folder (`run/student.pt`). They arrive from URLs,
so `resolve` is the one place that turns a name into a file and refuses anything that would leave
the job's folder: `..`, absolute names, NUL bytes, and symlinks pointing elsewhere.

The folder is where training writes. Whether it is also where everyone else reads is the
store's `storage` (`jobs.storage`): the shared folder itself, or an S3 bucket the worker
publishes to and fetches from.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobs.storage import Storage

_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Kind of a file by its name relative to the job's folder; first match wins.
_KINDS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^run/student\.pt$"), "student"),
    (re.compile(r"^run/checkpoints/(attempt-\d+/)?best\.pt$"), "best"),
    (re.compile(r"^run/checkpoints/(attempt-\d+/)?ckpt_\d+\.pt$"), "checkpoint"),
    (re.compile(r"^run/eval\.json$"), "eval"),
    (re.compile(r"^run/predictions\.json$"), "predictions"),
    (re.compile(r"^run/metrics\.jsonl$"), "metrics"),
    (re.compile(r"^run/spec\.yaml$"), "spec"),
    (re.compile(r"^logs\.txt$|\.log$"), "logs"),
    (re.compile(r"(^|/)tensorboard/|(^|/)events\.out\.tfevents\."), "tensorboard"),
)


class ArtifactNameError(ValueError):
    """An artifact name (or job id) that does not name a file inside the job's folder."""


def artifact_kind(name: str) -> str:
    """The kind of the artifact called `name` (student, checkpoint, best, eval, ...)."""
    for pattern, kind in _KINDS:
        if pattern.search(name):
            return kind
    return "other"


RUN_FOLDER = "run"


def job_of_run_file(path: Path | str) -> str | None:
    """The id of the job whose run folder holds the file `path` (as `ArtifactStore.run_dir`
    lays it out: `<root>/<job id>/run/<file>`), or None for a file elsewhere."""
    path = Path(path)
    job_id = path.parent.parent.name
    return job_id if path.parent.name == RUN_FOLDER and _JOB_ID.match(job_id) else None


class ArtifactStore:
    """Paths of jobs' files under `root`; creates nothing but what the caller writes."""

    def __init__(self, root: Path | str, storage: Storage | None = None) -> None:
        from jobs.storage import SharedFolder

        self.root = Path(root)
        self.storage: Storage = storage if storage is not None else SharedFolder(self.root)

    def publish(self, job_id: str, name: str) -> None:
        """Make the local file `name` readable by the API and other workers (a no-op when the
        folder is shared)."""
        self.storage.publish(job_id, name, self.resolve(job_id, name))

    def fetch(self, job_id: str, name: str, refresh: bool = False) -> bool:
        """Have the artifact `name` in the local folder, downloading it when another machine
        wrote it (with `refresh`, also when the stored copy differs from the local one, as a
        log another machine appended to does); False when it exists nowhere."""
        return self.storage.fetch(job_id, name, self.resolve(job_id, name), refresh)

    @property
    def shared(self) -> bool:
        """Whether this folder is what everyone reads (else it is this machine's scratch)."""
        return self.storage.shared

    def discard(self, job_id: str, name: str | None = None) -> None:
        """Delete the artifact (or, name None, the whole job) from the storage too."""
        self.storage.delete(job_id, name)

    def job_dir(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id):
            raise ArtifactNameError(f"{job_id!r} is not a job id")
        return self.root / job_id

    def run_dir(self, job_id: str) -> Path:
        """The folder hmkd_core trains into; resuming reuses it, so its checkpoints survive."""
        return self.job_dir(job_id) / RUN_FOLDER

    def checkpoint_dir(self, job_id: str, attempt: int) -> Path:
        """Where attempt `attempt` writes its checkpoints: no two attempts share a folder, so
        a stale process of an earlier attempt cannot overwrite what a later one reads."""
        return self.run_dir(job_id) / "checkpoints" / f"attempt-{attempt}"

    def prune_earlier_attempts(
        self, job_id: str, attempt: int, registered: list[str] | None = None
    ) -> list[Path]:
        """Delete the periodic checkpoints of attempts before `attempt`, once `attempt` has
        registered its own: resuming never goes back to them. `best.pt` files are kept.
        `registered` names the job's checkpoints on record, which the storage drops too
        (another machine's attempt has no local file here)."""
        removed = []
        for folder in (self.run_dir(job_id) / "checkpoints").glob("attempt-*"):
            number = folder.name.removeprefix("attempt-")
            if not number.isdigit() or int(number) >= attempt:
                continue
            for ckpt in folder.glob("ckpt_*.pt"):
                ckpt.unlink(missing_ok=True)
                removed.append(ckpt)
        for name in registered or []:
            match = re.match(r"^run/checkpoints/attempt-(\d+)/ckpt_\d+\.pt$", name)
            if match and int(match.group(1)) < attempt:
                self.discard(job_id, name)
        return removed

    def log_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "logs.txt"

    def resolve(self, job_id: str, name: str) -> Path:
        """The file called `name` in the job's folder; ArtifactNameError if `name` could reach
        outside it. Whether the file exists is left to the caller (a 404, not a 400)."""
        if not name or "\x00" in name or "\\" in name:
            raise ArtifactNameError(f"artifact name {name!r} is empty or holds NUL or backslash")
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts:
            raise ArtifactNameError(
                f"artifact name {name!r} must be relative to the job's folder, without '..' "
                "(e.g. run/student.pt)"
            )
        job_dir = self.job_dir(job_id)
        path = job_dir.joinpath(*pure.parts)
        if not path.resolve().is_relative_to(job_dir.resolve()):
            raise ArtifactNameError(f"artifact {name!r} points outside the job's folder")
        return path

    def scan(self, job_id: str) -> list[tuple[str, str, Path]]:
        """(name, kind, path) of every file in the job's folder, sorted by name.

        Hidden files (half-written temporaries of atomic writes) and symlinks are left out: a
        symlink is nothing a run writes, and following one could list a file outside the job.
        """
        job_dir = self.job_dir(job_id)
        found = []
        for dirpath, dirnames, filenames in os.walk(job_dir, followlinks=False):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for filename in filenames:
                path = Path(dirpath) / filename
                if filename.startswith(".") or path.is_symlink() or not path.is_file():
                    continue
                name = path.relative_to(job_dir).as_posix()
                found.append((name, artifact_kind(name), path))
        return sorted(found)

    @staticmethod
    def sha256(path: Path | str) -> str:
        return file_sha256(path)


def store_of(settings: Any) -> ArtifactStore:
    """The artifact store the settings describe: the artifacts folder, with the object storage
    of `storage_url` behind it when one is set."""
    from jobs.storage import storage_of

    return ArtifactStore(Path(settings.artifacts_dir), storage_of(settings))


def file_sha256(path: Path | str) -> str:
    """The file's sha256 (hex), read in 1 MiB chunks: checkpoints can be gigabytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
