"""Alembic revisions, oldest first (a package so they ship in the wheel)."""
