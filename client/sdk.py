"""A small httpx SDK for the job service: one method per endpoint.

Where it connects and as whom, when not passed: `HMKD_API_URL` / `HMKD_TOKEN`, else the
embedded default's settings (`api_url`, and the token `hmkd serve` wrote to `<data_dir>/token`).
Every error answer raises `ApiError` carrying the server's own message, which says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


class ApiError(Exception):
    """An error answer of the API (or no answer: status 0)."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"{status}: {format_detail(detail)}" if status else format_detail(detail))


class ChecksumMismatch(ApiError):
    """A downloaded file whose sha256 is not the one the server announced."""


def format_detail(detail: Any) -> str:
    """A server `detail` as text: validation errors become `field: message` lines."""
    if isinstance(detail, list):
        lines = []
        for item in detail:
            if isinstance(item, dict):
                field = item.get("field") or ".".join(str(p) for p in item.get("loc", []))
                lines.append(f"{field}: {item.get('msg', item)}")
            else:
                lines.append(str(item))
        return "\n".join(lines)
    return str(detail)


@dataclass(frozen=True)
class Event:
    """One server-sent event: `state`, `progress` (data: the job) or `evaluation`."""

    event: str
    data: Any
    id: str | None = None


def default_base_url() -> str:
    """`HMKD_API_URL`, else where a running `hmkd serve` of this data directory listens (it
    records its URL there), else the settings' default."""
    if url := os.environ.get("HMKD_API_URL"):
        return url
    from client.serve import API_URL_FILE
    from jobs.settings import Settings

    settings = Settings()
    try:
        return (settings.data_dir / API_URL_FILE).read_text().strip() or settings.api_url
    except (FileNotFoundError, UnicodeDecodeError):
        return settings.api_url


def default_token() -> str | None:
    if token := os.environ.get("HMKD_TOKEN"):
        return token
    from jobs.settings import Settings

    try:
        return (Settings().data_dir / "token").read_text().strip() or None
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    if response.is_stream_consumed is False:
        response.read()
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text or response.reason_phrase
    if response.status_code == 401 and "token" not in str(detail).lower():
        detail = f"{detail} (set HMKD_TOKEN, or start `hmkd serve` to get a local token)"
    raise ApiError(response.status_code, detail)


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Events from `text/event-stream` lines; comments (keep-alives) are skipped."""
    event, data, event_id = "message", [], None
    for line in lines:
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    payload: Any = json.loads(text)
                except ValueError:
                    payload = text
                yield Event(event, payload, event_id)
            event, data, event_id = "message", [], None
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            event = value
        elif key == "data":
            data.append(value)
        elif key == "id":
            event_id = value


class Client:
    """The job service over HTTP; use as a context manager or call `close()`."""

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = (base_url or default_base_url()).rstrip("/")
        token = token or default_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise ApiError(
                0, f"cannot reach {self.base_url}: {err}; is `hmkd serve` running?"
            ) from err
        _raise_for(response)
        return response

    # jobs
    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a job spec (a JobSpec as a dict); the same key never makes a second job."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/jobs", json=spec, headers=headers).json()

    def jobs(
        self,
        *,
        state: str | list[str] | None = None,
        kind: str | None = None,
        queue: str | None = None,
        name: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> dict[str, Any]:
        """One page, newest first: `{"items": [...], "next_cursor": ...}`."""
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = [state] if isinstance(state, str) else state
        for key, value in (("kind", kind), ("queue", queue), ("name", name), ("cursor", cursor)):
            if value:
                params[key] = value
        return self._call("GET", "/v1/jobs", params=params).json()

    def iter_jobs(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every matching job, following the cursor page after page."""
        cursor = None
        while True:
            page = self.jobs(cursor=cursor, **filters)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def metrics(self, job_id: str, since: int = 0) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}/metrics", params={"since": since}).json()

    def events(self, job_id: str, *, reconnects: int = 5) -> Iterator[Event]:
        """Follow a job until it is final, reconnecting after a dropped connection."""
        failures = 0
        timeout = httpx.Timeout(10.0, read=90.0)  # the server pings well within 90 s
        while True:
            try:
                with self._http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", timeout=timeout
                ) as response:
                    _raise_for(response)
                    for event in parse_sse(response.iter_lines()):
                        failures = 0
                        yield event
                        if event.event == "state" and event.data.get("state") in TERMINAL_STATES:
                            return
                return
            except (httpx.TransportError, httpx.StreamError) as err:
                failures += 1
                if failures > reconnects:
                    raise ApiError(0, f"lost the event stream of job {job_id}: {err}") from err
                time.sleep(min(10.0, 0.5 * 2**failures))

    def logs(self, job_id: str, tail: int | None = None) -> str:
        """The log's last `tail` lines, or all of it."""
        if tail is not None:
            return self.logs_tail(job_id, tail)[0]
        parts, offset = [], 0
        while True:
            text, end = self.logs_from(job_id, offset)
            parts.append(text)
            if end == offset:
                return "".join(parts)
            offset = end

    def logs_tail(self, job_id: str, lines: int) -> tuple[str, int]:
        """The log's last `lines` lines and the offset to follow it from."""
        r = self._call("GET", f"/v1/jobs/{job_id}/logs", params={"tail": lines})
        return r.text, int(r.headers.get("X-Log-Offset", 0))

    def logs_from(self, job_id: str, offset: int) -> tuple[str, int]:
        """The log from byte `offset` on (at most 1 MiB) and the offset to continue from."""
        r = self._call("GET", f"/v1/jobs/{job_id}/logs", params={"offset": offset})
        return r.text, int(r.headers.get("X-Log-Offset", offset))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel").json()

    def preempt(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/preempt").json()

    def retry(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/retry").json()

    def delete(self, job_id: str) -> dict[str, Any]:
        """Delete an ended job and its files; returns what it freed."""
        return self._call("DELETE", f"/v1/jobs/{job_id}").json()

    # artifacts
    def delete_artifact(self, job_id: str, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/jobs/{job_id}/artifacts/{name}").json()

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/jobs/{job_id}/artifacts").json()

    def download(
        self,
        job_id: str,
        name: str = "run/student.pt",
        dest: str | Path = ".",
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> Path:
        """Stream an artifact to `dest` (a file, or a folder to put it in) and check its sha256.

        Bytes arrive in `<dest>.part`, renamed when complete and verified; an interrupted
        download resumes from the partial file with a Range request.
        """
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / Path(name).name
        part = dest.with_name(dest.name + ".part")
        for _ in range(2):
            offset = part.stat().st_size if part.exists() else 0
            sums = self._fetch(job_id, name, part, offset, progress)
            if sums is None:  # the partial file did not fit the artifact: start over
                part.unlink(missing_ok=True)
                continue
            expected, actual = sums
            if actual == expected:
                os.replace(part, dest)
                return dest
            part.unlink(missing_ok=True)
            if offset == 0:
                break
        raise ChecksumMismatch(
            0, f"{name} of job {job_id}: sha256 differs from the server's; download it again"
        )

    def _fetch(
        self,
        job_id: str,
        name: str,
        part: Path,
        offset: int,
        progress: Callable[[int, int], None] | None,
    ) -> tuple[str, str] | None:
        """Write the artifact to `part` (appending from `offset` when the server agrees);
        (announced sha256, sha256 of `part`), or None when the range was refused."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        timeout = httpx.Timeout(30.0, read=300.0)
        url = f"/v1/jobs/{job_id}/artifacts/{name}"
        try:
            with self._http.stream("GET", url, headers=headers, timeout=timeout) as r:
                if r.status_code == 416:
                    return None
                _raise_for(r)
                digest = hashlib.sha256()
                if r.status_code == 206:
                    with open(part, "rb") as f:
                        for chunk in iter(lambda: f.read(1 << 20), b""):
                            digest.update(chunk)
                    done, mode = offset, "ab"
                    total = int(r.headers["content-range"].rsplit("/", 1)[1])
                else:  # the whole file: whatever was partial is replaced
                    done, mode = 0, "wb"
                    total = int(r.headers.get("content-length", 0))
                with open(part, mode) as f:
                    for chunk in r.iter_bytes(1 << 20):
                        f.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
                return r.headers["etag"].strip('"'), digest.hexdigest()
        except httpx.TransportError as err:
            raise ApiError(
                0, f"download of {name} interrupted ({err}); run it again to resume"
            ) from err

    # datasets
    def datasets(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/datasets").json()

    def dataset(
        self, ref: str, *, min_size: int | None = None, max_size: int | None = None
    ) -> dict[str, Any]:
        params = {k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v}
        return self._call("GET", f"/v1/datasets/{ref}", params=params).json()

    def upload_dataset(
        self,
        name: str,
        archive: str | Path,
        *,
        chunk_bytes: int = 8 << 20,
        resume_from: str | None = None,
        on_start: Callable[[str], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Upload a zip/tar of a COCO export as the next version of dataset `name`.

        `resume_from` is the id of an earlier, interrupted upload of the same file: sending
        continues at the offset the server holds. `on_start` gets the upload's id as soon as
        there is one, for the caller to keep. Returns the dataset the server made.
        """
        archive = Path(archive)
        size = archive.stat().st_size
        upload = None
        if resume_from is not None:
            try:
                upload = self._call("GET", f"/v1/datasets/uploads/{resume_from}").json()
            except ApiError as err:
                if err.status != 404:
                    raise
            if upload is not None and upload["size"] != size:
                upload = None  # the file changed since: start over
        if upload is None:
            upload = self._call(
                "POST", "/v1/datasets/uploads", json={"name": name, "size": size}
            ).json()
        if on_start is not None:
            on_start(upload["id"])
        offset = upload["offset"]
        url = f"/v1/datasets/uploads/{upload['id']}"
        with open(archive, "rb") as f:
            while offset < size:
                f.seek(offset)
                chunk = f.read(chunk_bytes)
                try:
                    offset = self._call(
                        "PUT",
                        url,
                        params={"offset": offset},
                        content=chunk,
                        headers={"content-type": "application/octet-stream"},
                        timeout=httpx.Timeout(30.0, write=300.0),
                    ).json()["offset"]
                except ApiError as err:
                    if err.status != 409:  # 409: the server holds another offset; go there
                        raise
                    offset = self._call("GET", url).json()["offset"]
                if progress is not None:
                    progress(offset, size)
        timeout = httpx.Timeout(30.0, read=3600.0)  # unpacking and checking take a while
        return self._call("POST", f"{url}/complete", timeout=timeout).json()

    # queue and health
    def queue(self) -> dict[str, Any]:
        return self._call("GET", "/v1/queue").json()

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/v1/health").json()

    def ready(self) -> dict[str, Any]:
        """Readiness; a 503 answer raises ApiError with the reasons in `detail`."""
        r = self._http.get("/v1/ready")
        if r.status_code == 503:
            raise ApiError(503, r.json())
        _raise_for(r)
        return r.json()
