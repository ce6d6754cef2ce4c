"""Datasets as objects: uploaded archives or registered server folders, checked on arrival.

An upload arrives in chunks (`start_upload`, `write_chunk`, each at the offset the server
holds, so an interrupted upload resumes where it stopped) and is unpacked by `finish_upload`
into the dataset store under the archive's sha256: the same archive uploaded twice is stored
once. Either way the splits are checked with the loader's own checks and summarised before the
dataset exists, so a spec naming `dataset: <name>[@<version>]` points at data known to load.

An archive holds COCO splits as `train/annotations.json` + `train/images/`, optionally `val/`
likewise, or a single split as `annotations.json` + `images/` (used for training); one folder
wrapping either layout is fine (what zipping a folder makes).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import stat
import tarfile
import uuid
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hmkd_core.data.coco import DatasetError, check_same_categories
from jobs.data_check import summary_of
from jobs.lifecycle import Conflict, InvalidJob, NotFound
from jobs.models import Dataset, DatasetUpload, User
from jobs.paths import PathNotAllowed, confine
from jobs.schemas import has_control_characters
from jobs.settings import Settings

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
REF = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.\-]{0,99}?)(?:@(\d{1,9}))?$")
SPLITS = ("train", "val")
MAX_ARCHIVE_MEMBERS = 2_000_000


class ArchiveError(ValueError):
    """An archive that cannot become a dataset; the message names the entry at fault."""


def _store(settings: Settings) -> Path:
    assert settings.dataset_store is not None
    return settings.dataset_store


def _upload_file(settings: Settings, upload_id: str) -> Path:
    return _store(settings) / ".uploads" / f"{upload_id}.part"


# ---------------------------------------------------------------------------------- uploads


def start_upload(session: Session, user: User, name: str, size: int, settings: Settings) -> Any:
    """A new upload of `size` bytes for dataset `name`; its chunks follow."""
    if size > settings.max_dataset_bytes:
        raise InvalidJob(
            "size", f"{size} bytes is over this server's limit of {settings.max_dataset_bytes}"
        )
    _drop_abandoned_uploads(session, settings)
    upload = DatasetUpload(team_id=user.team_id, user_id=user.id, name=name, size=size)
    session.add(upload)
    session.flush()
    path = _upload_file(settings, upload.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return upload


ABANDONED_AFTER_S = 24 * 3600


def _drop_abandoned_uploads(session: Session, settings: Settings) -> None:
    """Uploads untouched for a day (given up, or refused at the end) and their files."""
    from datetime import timedelta

    from jobs.models import utcnow

    cutoff = utcnow() - timedelta(seconds=ABANDONED_AFTER_S)
    for old in session.scalars(select(DatasetUpload).where(DatasetUpload.updated_at < cutoff)):
        _upload_file(settings, old.id).unlink(missing_ok=True)
        session.delete(old)


def get_upload(session: Session, user: User, upload_id: str) -> DatasetUpload:
    upload = session.get(DatasetUpload, upload_id)
    if upload is None or upload.team_id != user.team_id:
        raise NotFound(f"upload {upload_id} not found")
    return upload


def write_chunk(
    session: Session, upload: DatasetUpload, offset: int, data: bytes, settings: Settings
) -> int:
    """Append `data` at `offset`, which must be what the server holds so far; returns the new
    offset. A chunk sent twice (a retry after a lost answer) is refused with the offset to
    resume from, never appended twice."""
    # the row is locked while the chunk is written, so a retried chunk racing its first
    # delivery waits for it and then finds the offset moved on
    session.execute(select(DatasetUpload.id).where(DatasetUpload.id == upload.id).with_for_update())
    session.refresh(upload)
    if offset != upload.received:
        raise Conflict(
            f"upload {upload.id} holds {upload.received} bytes; send the chunk that starts "
            f"there (offset={upload.received}), not at {offset}"
        )
    if upload.received + len(data) > upload.size:
        raise InvalidJob(
            "body", f"the chunk runs past the upload's declared size of {upload.size} bytes"
        )
    path = _upload_file(settings, upload.id)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        f.truncate()
    upload.received = offset + len(data)
    session.flush()
    return upload.received


def finish_upload(
    session: Session, user: User, upload: DatasetUpload, settings: Settings
) -> Dataset:
    """Unpack the complete archive, check and summarise its splits, and make the dataset."""
    if upload.received != upload.size:
        raise Conflict(
            f"upload {upload.id} holds {upload.received} of {upload.size} bytes; send the rest "
            f"from offset {upload.received} first"
        )
    part = _upload_file(settings, upload.id)
    digest = _sha256(part)
    target = _store(settings) / digest
    if target.is_dir():  # the same archive, checked and kept before (only checked ones are)
        splits = _layout(target)
    else:
        # unpacked and checked in a folder of its own, moved into the store only once good:
        # a refused archive leaves nothing behind, and two uploads never share a scratch folder
        scratch = _store(settings) / ".unpacking" / uuid.uuid4().hex
        scratch.mkdir(parents=True)
        try:
            try:
                _unpack(part, scratch, settings.max_dataset_bytes)
            except ArchiveError as err:
                raise InvalidJob("archive", str(err)) from None
            splits = _layout(scratch)
            _create(session, user, upload.name, digest, "upload", splits, scratch, dry_run=True)
            with contextlib.suppress(OSError):  # the same archive, stored meanwhile
                scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    dataset = _create(session, user, upload.name, digest, "upload", splits, target)
    assert dataset is not None
    session.delete(upload)
    session.flush()
    part.unlink(missing_ok=True)
    return dataset


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _member_path(name: str) -> PurePosixPath:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or "\x00" in name:
        raise ArchiveError(f"archive entry {name!r} leads outside the archive")
    if has_control_characters(name):  # a tar's bytes that are not UTF-8 decode to surrogates
        raise ArchiveError(
            f"archive entry {name!r} holds control characters or bytes that are not UTF-8"
        )
    return pure


# A tar member's extended (PAX) header, which tarfile keeps in memory, is capped at this.
MAX_HEADER_BYTES = 64 * 1024


def _unpack(archive: Path, dest: Path, max_bytes: int) -> None:
    """Unpack a zip or tar (plain, gz, bz2, xz) into `dest`: regular files and folders only,
    nothing outside `dest`, at most `max_bytes` unpacked. A tar is read member by member and
    checked as it goes, so a hostile archive cannot make the server hold its headers in
    memory. Whatever goes wrong is an ArchiveError."""
    try:
        if zipfile.is_zipfile(archive):
            _unzip(archive, dest, max_bytes)
        else:
            _untar(archive, dest, max_bytes)
    except ArchiveError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        # a name that is not UTF-8 raises UnicodeDecodeError, a ValueError; the server's own
        # folders are left out of what the user reads
        text = str(err).replace(f"{dest}/", "").replace(str(dest), ".")
        raise ArchiveError(
            f"the archive cannot be unpacked: {type(err).__name__}: {text}"
        ) from None


def _unzip(archive: Path, dest: Path, max_bytes: int) -> None:
    with zipfile.ZipFile(archive) as z:
        infos = z.infolist()
        _check_totals(len(infos), sum(i.file_size for i in infos), max_bytes)
        for info in infos:
            _member_path(info.filename)
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix type recorded
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ArchiveError(f"archive entry {info.filename!r} is not a file or folder")
        z.extractall(dest)


def _untar(archive: Path, dest: Path, max_bytes: int) -> None:
    try:
        tar = tarfile.open(archive)  # noqa: SIM115 - closed by the `with tar` below
    except tarfile.TarError as err:
        raise ArchiveError(f"not a zip or tar archive ({err})") from None
    members, unpacked = 0, 0
    with tar:
        while (member := tar.next()) is not None:
            members += 1
            unpacked += member.size
            _check_totals(members, unpacked, max_bytes)
            headers = sum(len(k) + len(v) for k, v in member.pax_headers.items())
            if headers > MAX_HEADER_BYTES:
                raise ArchiveError(f"archive entry {member.name!r} has {headers} bytes of headers")
            _member_path(member.name)
            if not (member.isfile() or member.isdir()):
                raise ArchiveError(f"archive entry {member.name!r} is not a file or folder")
            tar.extract(member, dest, filter="data")
            tar.members.clear()  # extracted: nothing later refers back to it (links are refused)


def _check_totals(members: int, unpacked: int, max_bytes: int) -> None:
    if members > MAX_ARCHIVE_MEMBERS:
        raise ArchiveError(f"{members} entries; at most {MAX_ARCHIVE_MEMBERS} are unpacked")
    if unpacked > max_bytes:
        raise ArchiveError(f"unpacks to {unpacked} bytes, over this server's {max_bytes}")


def _layout(root: Path) -> dict[str, dict[str, str]]:
    """The splits of an unpacked archive, as paths relative to `root`."""
    base = root
    entries = [p for p in base.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and not _has_split(root):
        base = entries[0]  # one folder wrapping the layout
    splits = {}
    if (base / "annotations.json").is_file():
        splits["train"] = base
    for split in SPLITS:
        if (base / split / "annotations.json").is_file():
            splits[split] = base / split
    if "train" not in splits:
        raise InvalidJob(
            "archive",
            "found no train/annotations.json (with train/images/) nor annotations.json (with "
            "images/) at the top of the archive or of the one folder in it",
        )
    return {
        split: {
            "images": (folder / "images").relative_to(root).as_posix(),
            "annotations": (folder / "annotations.json").relative_to(root).as_posix(),
        }
        for split, folder in splits.items()
    }


def _has_split(folder: Path) -> bool:
    return (folder / "annotations.json").is_file() or (folder / "train").is_dir()


# -------------------------------------------------------------------------- registration


def register_path(
    session: Session,
    user: User,
    name: str,
    splits: dict[str, dict[str, str]],
    settings: Settings,
) -> Dataset:
    """Make a dataset of server folders under the dataset roots (an administrator's act: the
    files stay where they are, so their owner must not change them under a version)."""
    absolute = {}
    for split, paths in splits.items():
        absolute[split] = {}
        for attr in ("images", "annotations"):
            field = f"{split}.{attr}"
            try:
                absolute[split][attr] = str(
                    confine(paths[attr], settings.dataset_roots, field=field)
                )
            except PathNotAllowed as err:
                raise InvalidJob(field, err.message) from None
    digest = hashlib.sha256()
    for split in sorted(absolute):
        annotations = Path(absolute[split]["annotations"])
        try:
            digest.update(annotations.read_bytes())
        except OSError as err:  # a folder, or a file the server may not read
            raise InvalidJob(
                f"{split}.annotations", f"{annotations} cannot be read: {err.strerror}"
            ) from None
    dataset = _create(session, user, name, digest.hexdigest(), "path", absolute, None)
    assert dataset is not None
    return dataset


def _create(
    session: Session,
    user: User,
    name: str,
    digest: str,
    source: str,
    splits: dict[str, dict[str, str]],
    root: Path | None,
    *,
    dry_run: bool = False,
) -> Dataset | None:
    """Check the splits as the loader does, then insert the next version of `name` (with
    `dry_run`, only check: InvalidJob naming the split and the entry, else None)."""
    summaries = {}
    for split, paths in splits.items():
        images = root / paths["images"] if root else Path(paths["images"])
        annotations = root / paths["annotations"] if root else Path(paths["annotations"])
        try:
            summaries[split] = summary_of(images, annotations, (800, 1333))
        except DatasetError as err:
            raise InvalidJob(split, _relative(str(err), root)) from None
    if "val" in summaries:
        try:
            check_same_categories(
                summaries["train"].category_names,
                summaries["val"].category_names,
                splits["val"]["annotations"],
            )
        except DatasetError as err:
            raise InvalidJob("val", str(err)) from None
    if dry_run:
        return None
    latest = session.scalar(
        select(func.max(Dataset.version)).where(
            Dataset.team_id == user.team_id, Dataset.name == name
        )
    )
    stored = {
        split: {k: str(root / v) if root else v for k, v in paths.items()}
        for split, paths in splits.items()
    }
    dataset = Dataset(
        team_id=user.team_id,
        user_id=user.id,
        name=name,
        version=(latest or 0) + 1,
        sha256=digest,
        source=source,
        splits=stored,
        stats={split: s.as_dict() for split, s in summaries.items()},
        size=_folder_size(root) if root else 0,
    )
    session.add(dataset)
    session.flush()
    return dataset


def _relative(message: str, root: Path | None) -> str:
    """Errors about an unpacked archive name its entries, not the server's folders."""
    return message.replace(f"{root}/", "") if root else message


def _folder_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------- reading


def find(session: Session, user: User, ref: str, field: str = "dataset") -> Dataset:
    """The team's dataset `name` (its newest version) or `name@version`."""
    m = REF.match(ref)
    if m is None:
        raise InvalidJob(field, f"{ref!r} is not a dataset name, nor name@version")
    name, version = m.group(1), m.group(2)
    query = select(Dataset).where(Dataset.team_id == user.team_id, Dataset.name == name)
    if version is not None:
        query = query.where(Dataset.version == int(version))
    found = session.scalar(query.order_by(Dataset.version.desc()).limit(1))
    if found is None:
        which = f"version {version} of " if version else ""
        raise NotFound(f"no {which}dataset {name!r} in your team")
    return found


def list_datasets(session: Session, user: User) -> list[Dataset]:
    return list(
        session.scalars(
            select(Dataset)
            .where(Dataset.team_id == user.team_id)
            .order_by(Dataset.name, Dataset.version.desc())
        )
    )


def complete_dataset(session: Session, user: User, body: Any) -> Any:
    """A submitted spec (as JSON) naming `dataset: <name>[@<version>]` (or, the same,
    `data: dataset:<name>[@<version>]`), with `data.train`/`data.val` filled from
    that dataset and the reference pinned to its version (`name@3`), so the stored spec says
    exactly what was trained on. Giving split paths as well is refused."""
    if not isinstance(body, dict):
        return body
    data_ref = body.get("data")
    if isinstance(data_ref, str) and data_ref.startswith("dataset:"):
        if "dataset" in body:
            raise InvalidJob(
                "data", "give the dataset once: `dataset: <name>` or `data: dataset:<name>`"
            )
        body = {**body, "dataset": data_ref.removeprefix("dataset:"), "data": {}}
    if not isinstance(body.get("dataset"), str):
        return body
    data = body.get("data") if isinstance(body.get("data"), dict) else {}
    given = [split for split in SPLITS if split in data]
    if given:
        raise InvalidJob(
            f"data.{given[0]}", "give either `dataset` or the split paths in data, not both"
        )
    try:
        dataset = find(session, user, body["dataset"])
    except NotFound as err:
        raise InvalidJob("dataset", str(err)) from None
    return {
        **body,
        "dataset": f"{dataset.name}@{dataset.version}",
        "data": {**data, **dataset.splits},
    }
