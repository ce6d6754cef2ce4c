"""Alembic history of the service's database (`jobs.models`), shipped as a package.

The scripts travel with the installed code, so `hmkd db upgrade` works from a wheel: `jobs.migrate`
builds the Alembic config in code, pointing at this folder; there is no alembic.ini.
"""

from pathlib import Path

LOCATION = Path(__file__).resolve().parent
