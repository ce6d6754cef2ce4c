"""Where a job's files are kept for the API and for other machines: a shared folder, or an
S3-compatible bucket.

A worker always trains into a local folder laid out by `ArtifactStore`. With a shared
filesystem (NFS, a cluster file system, or one machine) that folder *is* the store, and
nothing is copied. With object storage the local folder is the worker's scratch: the worker
publishes each file it registers (a checkpoint as soon as it is written, the rest when the
attempt ends), the API streams downloads from the bucket, and a worker resuming a job whose
checkpoint another machine wrote, or loading another job's student as its teacher, fetches
the file first. The bucket's keys are `<prefix>/<job id>/<artifact name>`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

CHUNK_BYTES = 1 << 20


class StorageError(RuntimeError):
    """Object storage refused or failed an operation; the message says which and where."""


class Storage(Protocol):
    """What a job's files need beyond the local folder: publishing, fetching, streaming."""

    # whether the local artifacts folder is what everyone reads (else a machine's scratch)
    shared: bool

    def publish(self, job_id: str, name: str, path: Path) -> None:
        """Make the local file `path` the artifact `name` of the job, for every machine."""

    def fetch(self, job_id: str, name: str, dest: Path, refresh: bool = False) -> bool:
        """Put the artifact at `dest` unless it is already there (with `refresh`, replace it
        by the stored copy when they differ); False when it exists nowhere."""

    def local_path(self, job_id: str, name: str) -> Path | None:
        """The file itself when this machine can read it directly, else None."""

    def size(self, job_id: str, name: str) -> int | None:
        """The stored object's size, None when it is absent."""

    def read(
        self, job_id: str, name: str, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        """Bytes `start`..`end` (inclusive; None: to the end), in chunks."""

    def delete(self, job_id: str, name: str | None = None) -> None:
        """Delete one artifact, or (name None) every artifact of the job."""


class SharedFolder:
    """The artifacts root on a filesystem every worker and the API mount at the same path."""

    shared = True

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def _path(self, job_id: str, name: str) -> Path:
        from jobs.artifacts import ArtifactStore

        return ArtifactStore(self.root).resolve(job_id, name)

    def publish(self, job_id: str, name: str, path: Path) -> None:
        target = self._path(job_id, name)
        if target.resolve() == Path(path).resolve():
            return  # written in place, the usual case
        _copy_atomic(Path(path), target)

    def fetch(self, job_id: str, name: str, dest: Path, refresh: bool = False) -> bool:
        source = self._path(job_id, name)
        if dest.is_file() and (not refresh or source.resolve() == dest.resolve()):
            return True
        if not source.is_file():
            return False
        _copy_atomic(source, dest)
        return True

    def local_path(self, job_id: str, name: str) -> Path | None:
        return self._path(job_id, name)

    def size(self, job_id: str, name: str) -> int | None:
        path = self._path(job_id, name)
        return path.stat().st_size if path.is_file() else None

    def read(
        self, job_id: str, name: str, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        with open(self._path(job_id, name), "rb") as f:
            f.seek(start)
            left = None if end is None else end - start + 1
            while left is None or left > 0:
                chunk = f.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    def delete(self, job_id: str, name: str | None = None) -> None:
        pass  # the folder is the local one: `jobs.retention` removes its files


class S3Bucket:
    """An S3-compatible bucket (AWS S3, MinIO, Ceph RGW...) through boto3.

    Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a
    profile, an instance role); `endpoint_url` points it at a server other than AWS.
    """

    shared = False

    def __init__(self, url: str, *, endpoint_url: str | None = None, region: str | None = None):
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"storage_url {url!r} must look like s3://bucket[/prefix]")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _client(self.endpoint_url, self.region)
        return self._client

    def key(self, job_id: str, name: str = "") -> str:
        from jobs.artifacts import ArtifactStore

        if name:
            ArtifactStore(Path("/")).resolve(job_id, name)  # the same rules as on disk
        parts = [p for p in (self.prefix, job_id, name) if p]
        return "/".join(parts)

    def _call(self, what: str, key: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"s3://{self.bucket}/{key}") from None
            raise StorageError(f"{what} s3://{self.bucket}/{key}: {code or err}") from err
        except BotoCoreError as err:
            raise StorageError(f"{what} s3://{self.bucket}/{key}: {err}") from err

    def publish(self, job_id: str, name: str, path: Path) -> None:
        key = self.key(job_id, name)
        try:  # multipart above 8 MiB, so a checkpoint of gigabytes goes up in parts
            self.client.upload_file(str(path), self.bucket, key)
        except _boto_errors() as err:
            raise StorageError(f"upload to s3://{self.bucket}/{key}: {err}") from err

    def fetch(self, job_id: str, name: str, dest: Path, refresh: bool = False) -> bool:
        if dest.is_file() and not refresh:
            return True
        key = self.key(job_id, name)
        size = self.size(job_id, name)
        if size is None:
            return dest.is_file()
        if dest.is_file() and dest.stat().st_size == size:
            return True
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            self.client.download_file(self.bucket, key, str(tmp))
            os.replace(tmp, dest)
        except _boto_errors() as err:
            raise StorageError(f"download of s3://{self.bucket}/{key}: {err}") from err
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def local_path(self, job_id: str, name: str) -> Path | None:
        return None

    def size(self, job_id: str, name: str) -> int | None:
        key = self.key(job_id, name)
        try:
            head = self._call("HEAD", key, self.client.head_object, Key=key)
        except FileNotFoundError:
            return None
        return int(head["ContentLength"])

    def read(
        self, job_id: str, name: str, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        key = self.key(job_id, name)
        extra = {}
        if start or end is not None:
            extra["Range"] = f"bytes={start}-{'' if end is None else end}"
        body = self._call("GET", key, self.client.get_object, Key=key, **extra)["Body"]
        try:
            yield from body.iter_chunks(CHUNK_BYTES)
        finally:
            body.close()

    def delete(self, job_id: str, name: str | None = None) -> None:
        if name is not None:
            key = self.key(job_id, name)
            self._call("DELETE", key, self.client.delete_object, Key=key)
            return
        prefix = self.key(job_id) + "/"
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self._call("DELETE", prefix, self.client.delete_objects, Delete={"Objects": keys})


_CLIENT_LOCK = threading.Lock()


@functools.cache
def _client(endpoint_url: str | None, region: str | None) -> Any:
    """One S3 client per endpoint and process, made under a lock from a session of its own:
    clients are thread-safe, making them from boto3's shared default session is not. Short
    timeouts: an unreachable endpoint fails a request in seconds, not minutes."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as err:  # pragma: no cover - depends on the install
        raise StorageError(
            "storage_url is s3://... but boto3 is not installed: pip install 'hmkd[s3]'"
        ) from err
    with _CLIENT_LOCK:
        return boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(
                connect_timeout=5,
                read_timeout=60,
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        )


def _boto_errors() -> tuple[type[Exception], ...]:
    """What boto3's transfers raise: botocore's errors and boto3's own (S3UploadFailedError)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError, Boto3Error


def storage_settings(settings: Any) -> dict[str, str | None]:
    """The settings `storage_from` takes, as plain data a training process is handed."""
    return {
        "url": settings.storage_url,
        "endpoint_url": settings.s3_endpoint_url,
        "region": settings.s3_region,
    }


def storage_from(
    root: Path | str,
    url: str | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> Storage:
    """The bucket `url` names (s3://bucket[/prefix]), else the shared folder `root`."""
    if url:
        return S3Bucket(url, endpoint_url=endpoint_url, region=region)
    return SharedFolder(root)


def storage_of(settings: Any) -> Storage:
    """The storage the settings name: `storage_url` s3://... or the shared artifacts folder."""
    return storage_from(settings.artifacts_dir, **storage_settings(settings))


def _copy_atomic(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
