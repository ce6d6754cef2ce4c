"""Signed, short-lived download links for artifacts.

A browser that downloads a multi-gigabyte checkpoint should stream it to disk, which means a
plain navigation to a URL, and a navigation cannot carry an `Authorization` header. Putting the
API token into that URL would leak a long-lived secret into history, logs and proxies. Instead
the API signs a link that grants one artifact of one job to one team for a few minutes:

    <payload>.<signature>   payload = base64url(JSON [job_id, name, team_id, user_id, expires])
                            signature = base64url(HMAC-SHA256(key, "hmkd-download-v1." payload))

The link is checked when a download starts (a download already streaming outlives it), and the
job must still belong to the team then. The key comes from `HMKD_DOWNLOAD_SECRET`, or is made
once and kept in `<data_dir>/download.key` (0600).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from jobs.schemas import has_control_characters
from jobs.settings import Settings

_CONTEXT = b"hmkd-download-v1."
MIN_SECRET_CHARS = 32
KEY_FILE = "download.key"


class InvalidLink(ValueError):
    """A link this service did not sign, or one altered since."""


class ExpiredLink(InvalidLink):
    """A genuine link whose time is up: ask the API for a new one."""


@dataclass(frozen=True)
class DownloadGrant:
    """What a link allows: `name` of job `job_id`, for team `team_id`, until `expires_at`."""

    job_id: str
    name: str
    team_id: int
    user_id: int
    expires_at: datetime


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, _CONTEXT + payload.encode(), hashlib.sha256).digest())


def sign_link(key: bytes, grant: DownloadGrant) -> str:
    """The opaque link text for `grant` (URL-safe, no padding)."""
    body = [grant.job_id, grant.name, grant.team_id, grant.user_id, grant.expires_at.timestamp()]
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    return f"{payload}.{_signature(key, payload)}"


def verify_link(key: bytes, link: str, *, now: datetime | None = None) -> DownloadGrant:
    """The grant `link` carries; InvalidLink if it was not signed with `key` or was altered,
    ExpiredLink if it is genuine but past its time."""
    payload, dot, signature = link.partition(".")
    if (
        not dot
        or not payload
        or not hmac.compare_digest(_signature(key, payload).encode(), signature.encode())
    ):
        raise InvalidLink("this download link is not valid; open the job page and download again")
    try:
        job_id, name, team_id, user_id, expires = json.loads(_unb64(payload))
        grant = DownloadGrant(
            job_id=str(job_id),
            name=str(name),
            team_id=int(team_id),
            user_id=int(user_id),
            expires_at=datetime.fromtimestamp(float(expires), UTC),
        )
        ids_fit = all(0 <= v < 2**31 for v in (grant.team_id, grant.user_id))
        text_clean = not has_control_characters(grant.job_id + grant.name)
        if not (ids_fit and text_clean):
            raise ValueError("ids out of range or control characters")
    # signed with our key yet not of our making (a leaked key): refuse, never a 500
    except (binascii.Error, ValueError, TypeError, OverflowError, OSError) as err:
        raise InvalidLink("this download link is malformed") from err
    if (now or datetime.now(UTC)) >= grant.expires_at:
        raise ExpiredLink("this download link has expired; open the job page and download again")
    return grant


def signing_key(settings: Settings) -> bytes:
    """The configured secret, else the data folder's key file, created on first use.

    The file is written aside and hard-linked into place, so concurrent API processes sharing a
    data folder agree on one key (the loser of the race reads the winner's).
    """
    if settings.download_secret is not None:
        secret = settings.download_secret.get_secret_value()
        if len(secret) < MIN_SECRET_CHARS:
            raise ValueError(
                f"HMKD_DOWNLOAD_SECRET has {len(secret)} characters; use at least "
                f"{MIN_SECRET_CHARS} random ones (e.g. `openssl rand -hex 32`)"
            )
        return secret.encode()
    path = Path(settings.data_dir) / KEY_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return bytes.fromhex(path.read_text().strip())
