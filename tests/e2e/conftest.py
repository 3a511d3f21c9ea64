"""End-to-end fixtures: a pipeline on a private broker and a private database per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.pipeline import Pipeline
from tests.fixtures.fix_broker import PKIFixture


@pytest.fixture
def make_pipeline(
    test_pki: PKIFixture,
    broker_factory: Callable[..., Any],
    pg_factory: Callable[..., Any],
    tmp_path: Path,
) -> Iterator[Callable[..., Pipeline]]:
    """`make_pipeline(gateways=N, clock_offsets_s=..., sim_faults_toml=...)`, started.

    The broker and database are private (the fault tests stop them); every program the
    pipeline started is stopped afterwards, and its logs stay under tmp_path/plant/logs.
    """
    made: list[Pipeline] = []

    def make(**options: Any) -> Pipeline:
        plant = Pipeline(
            tmp_path / "plant",
            pki=test_pki,
            broker=broker_factory(),
            database=pg_factory(),
            **options,
        )
        made.append(plant)
        plant.start()
        return plant

    try:
        yield make
    finally:
        for plant in made:
            plant.close()
