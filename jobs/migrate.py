"""Schema migrations from code: `hmkd db upgrade`, and the start-up check of the API and workers.

The Alembic config is built here, pointing at the installed `migrations` package, so an installed
service migrates its database without an alembic.ini or a source checkout. A service refuses to
start on a database that is not at the code's head revision: running on an old schema fails
later, mid-job, with errors that hide the cause.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, make_url, pool

import migrations


class DatabaseNotMigrated(RuntimeError):
    """The database's schema is not the one this code needs; the message says what to run."""

    def __init__(self, message: str, *, current: str | None, head: str) -> None:
        super().__init__(message)
        self.current = current
        self.head = head


def display_url(url: str) -> str:
    """The URL as it may be shown in messages and logs: its password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL has no password we could find; show nothing of it
        return "<unparsable database URL>"


def _config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations.LOCATION))
    if url is not None:
        # Not set_main_option: a URL-encoded password holds '%', which ConfigParser interpolates.
        config.attributes["url"] = url
    return config


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head_revision() -> str:
    """The revision this code's models correspond to."""
    head = _script().get_current_head()
    if head is None:  # only a broken install has no revision at all
        raise RuntimeError(f"no migration scripts found in {migrations.LOCATION}")
    return head


def _sqlite_file_missing(url: str) -> bool:
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite"):
        return False
    database = parsed.database or ""
    return database not in ("", ":memory:") and not Path(database).exists()


def current_revision(url: str) -> str | None:
    """The revision the database is at; None for an empty database (or a missing SQLite file,
    which is not created by asking)."""
    if _sqlite_file_missing(url):
        return None
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate the database to `revision` (default: the code's head); a no-op when already there.

    Creates the folder of a SQLite file if needed, so the embedded default starts from nothing.
    """
    parsed = make_url(database_url)
    if parsed.drivername.startswith("sqlite") and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(_config(database_url), revision)


def check_current(url: str) -> None:
    """Raise DatabaseNotMigrated unless the database is at the code's head revision."""
    head = head_revision()
    current = current_revision(url)
    if current == head:
        return
    shown = display_url(url)
    known = {script.revision for script in _script().walk_revisions()}
    if current is not None and current not in known:
        raise DatabaseNotMigrated(
            f"database {shown} is at revision {current}, which this code does not know (code "
            f"needs {head}): it was migrated by a newer hmkd; install that version here",
            current=current,
            head=head,
        )
    raise DatabaseNotMigrated(
        f"database {shown} is not migrated (at {current or 'empty'}, code needs {head}): "
        "run `hmkd db upgrade`",
        current=current,
        head=head,
    )
