"""Shared fixtures live in plugin modules under tests/fixtures (psycopg's habit)."""

pytest_plugins = [
    "tests.fixtures.fix_postgres",
    "tests.fixtures.fix_broker",
    "tests.fixtures.fix_system",
]
