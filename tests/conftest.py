"""Shared fixtures live in plugin modules under tests/fixtures (psycopg's habit)."""

import os

# Tests contact only loopback and what they create: no pip run by a test (provision,
# install.sh, a wheel build) may ask a package index. scripts/bootstrap fetched what
# bundles need into the wheel cache beforehand; anything else fails here, visibly.
os.environ["PIP_NO_INDEX"] = "1"

pytest_plugins = [
    "tests.fixtures.fix_postgres",
    "tests.fixtures.fix_broker",
    "tests.fixtures.fix_system",
]
