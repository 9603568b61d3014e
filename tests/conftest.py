"""Shared fixtures: a fresh SQLite file or a fresh PostgreSQL database per test.

PostgreSQL tests need TASKHERD_TEST_POSTGRES_URL (e.g. postgresql://postgres@127.0.0.1/test);
without it they skip and say why. `.ci/run` always sets it. Each test gets its own database,
cloned from a template built once per run, so runs never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from workers.store import Store

POSTGRES_ENV = "TASKHERD_TEST_POSTGRES_URL"


def _admin_url() -> sa.URL | None:
    raw = os.environ.get(POSTGRES_ENV)
    if not raw:
        return None
    return sa.make_url(raw).set(drivername="postgresql+psycopg")


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[sa.URL]:
    """A database with the schema applied, cloned by each PostgreSQL test."""
    admin = _admin_url()
    if admin is None:
        pytest.skip(f"{POSTGRES_ENV} is not set: PostgreSQL tests skipped")
    name = f"taskherd_tpl_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = admin.set(database=name)
    store = Store(url.render_as_string(hide_password=False))
    store.init_schema()
    store.dispose()
    yield url
    with engine.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    engine.dispose()


@pytest.fixture
def postgres_url(postgres_template: sa.URL) -> Iterator[str]:
    """A fresh PostgreSQL database holding the schema and no rows."""
    admin = _admin_url()
    assert admin is not None
    name = f"taskherd_t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{postgres_template.database}"')
    yield admin.set(database=name).render_as_string(hide_password=False)
    with engine.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file holding the schema and no rows."""
    url = f"sqlite:///{tmp_path / 'taskherd.db'}"
    store = Store(url, create=True)
    store.init_schema()
    store.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs on both engines."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    store = Store(database_url)
    yield store
    store.dispose()
