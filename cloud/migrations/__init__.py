"""Alembic migrations of the millrace schema; run through `millrace db upgrade`."""
