"""One settings object, read from `HMKD_*` environment variables.

With nothing set, everything lives in one data folder (SQLite database, SQLite broker through
kombu's SQLAlchemy transport, artifacts on disk): the embedded default. Setting
`HMKD_DATABASE_URL` to PostgreSQL and `HMKD_BROKER_URL` to Redis is the team deployment; no
code path differs.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HMKD_", extra="ignore")

    data_dir: Path = Field(Path.home() / ".hmkd", description="Embedded default's home.")
    database_url: str = Field("", description="Default: sqlite:///<data_dir>/hmkd.db")
    broker_url: str = Field("", description="Default: sqla+sqlite:///<data_dir>/broker.db")
    artifacts_dir: Path | None = Field(None, description="Default: <data_dir>/artifacts")
    storage_url: str | None = Field(
        None,
        description="Object storage for artifacts, s3://bucket[/prefix] (AWS S3, MinIO, ...). "
        "Default: none, the artifacts folder is shared by every worker and the API.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="The S3 API's address when it is not AWS's (MinIO: http://host:9000)."
    )
    s3_region: str | None = Field(None, description="The bucket's region, where it matters.")
    dataset_roots: list[Path] = Field(
        default_factory=list,
        description="Folders job datasets must lie under. Default: <data_dir>/datasets.",
    )
    dataset_store: Path | None = Field(
        None,
        description="Where uploaded datasets are unpacked, one folder per archive sha256. "
        "Default: <data_dir>/dataset-store. Specs reach it only by `dataset: <name>`.",
    )
    max_dataset_bytes: int = Field(
        50 * 2**30, gt=0, description="Largest dataset archive, packed and unpacked."
    )
    upload_chunk_bytes: int = Field(
        16 * 2**20, gt=0, description="Largest chunk of a dataset upload in one request."
    )
    default_queue: str = "default"
    lease_seconds: float = Field(
        60.0, gt=0, description="A claimed job's lease; renewed by heartbeat."
    )
    heartbeat_seconds: float = Field(5.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    max_running_per_team: int | None = Field(
        None,
        ge=1,
        description="At most this many jobs of one team run at once (`hmkd teams limit` sets "
        "a team's own cap); the others wait queued. None: no cap.",
    )
    sweep_seconds: float = Field(15.0, gt=0, description="Re-publish / re-queue period.")
    redispatch_seconds: float = Field(
        600.0,
        gt=0,
        description="Publish again a job still queued this long after its last publish: a "
        "broker that lost the message (a Redis restart without persistence) delays, never "
        "loses, a job; the claim makes a duplicate harmless.",
    )
    progress_interval_seconds: float = Field(2.0, ge=0, description="Throttle of progress writes.")
    max_body_bytes: int = Field(1_000_000, gt=0)
    visibility_timeout_seconds: int = Field(
        12 * 3600,
        description="Redis redelivers an unacked message after this; the lease makes a "
        "redelivery harmless, this only bounds how soon a lost message comes back.",
    )
    node_address: str = Field(
        "",
        description="The address other workers reach this one at, for multi-node jobs' "
        "rendezvous and process group. Default: this host's name (socket.getfqdn()).",
    )
    rendezvous_port: int = Field(
        29400,
        ge=0,
        le=65535,
        description="The port a multi-node job's first node serves its c10d rendezvous on (the "
        "another free port when it is taken; 0: any free port).",
    )
    rendezvous_timeout_s: float = Field(
        300.0,
        gt=0,
        description="How long a multi-node job's nodes may take to join; a node that has not "
        "by then is taken as lost and the group restarts.",
    )
    api_url: str = Field("http://127.0.0.1:8000", description="Where the CLI finds the API.")
    download_secret: SecretStr | None = Field(
        None,
        description="Key that signs short-lived download links. Default: a random key kept in "
        "<data_dir>/download.key; set it to one value on every API replica behind one address.",
    )
    download_link_seconds: float = Field(
        300.0, gt=0, le=86400, description="How long a signed download link may be started."
    )

    @model_validator(mode="after")
    def _defaults_from_data_dir(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'hmkd.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.db'}"
        if self.artifacts_dir is None:
            self.artifacts_dir = self.data_dir / "artifacts"
        if not self.dataset_roots:
            self.dataset_roots = [self.data_dir / "datasets"]
        self.dataset_roots = [p.expanduser().resolve() for p in self.dataset_roots]
        if self.dataset_store is None:
            self.dataset_store = self.data_dir / "dataset-store"
        self.dataset_store = self.dataset_store.expanduser().resolve()
        if self.storage_url:
            from urllib.parse import urlparse

            parsed = urlparse(self.storage_url)
            if parsed.scheme != "s3" or not parsed.netloc:
                raise ValueError(
                    f"HMKD_STORAGE_URL {self.storage_url!r} must look like s3://bucket[/prefix]"
                )
        return self

    @property
    def embedded(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
