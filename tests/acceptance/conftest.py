from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.pool import Pool


@pytest.fixture
def start_pool(sqlite_url: str, tmp_path: Path) -> Iterator[Callable[..., Pool]]:
    """Start supervisors on a fresh SQLite file; every one is killed at teardown."""
    pools: list[Pool] = []

    def start(database_url: str | None = None, **kwargs: Any) -> Pool:
        pool = Pool(database_url or sqlite_url, tmp_path, **kwargs)
        pools.append(pool)
        return pool

    yield start
    for pool in pools:
        pool.close()
