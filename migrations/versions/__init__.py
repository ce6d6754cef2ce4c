"""Revision scripts; a package only so that they install with the code (Alembic skips this file)."""
