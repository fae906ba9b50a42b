"""Database URLs for the engine's functional tests: SQLite and local PostgreSQL.

The PostgreSQL database is created with a unique name for this run and
dropped afterwards. PostgreSQL is required (tools/install-deps.sh installs
and starts it): if the server is unreachable those cases FAIL with a clear
message, they never skip. ``VTPCM_TEST_PG_URL`` points at another server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy.exc import OperationalError

from vtpcm_nova.engine.db import api, migration

PG_ADMIN_URL = os.environ.get("VTPCM_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = "vtpcm_engine_" + uuid.uuid4().hex[:12]
    admin = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT",
                                     connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except OperationalError as err:
        admin.dispose()
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} unreachable (required: "
                    f"tools/install-deps.sh installs and starts it): {err.orig}", pytrace=False)
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an EMPTY database per test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/engine.sqlite"
        return
    base: str = request.getfixturevalue("pg_url")
    # one schema per test keeps tests independent inside the run's database
    schema = "t_" + uuid.uuid4().hex[:12]
    # a transaction a failed test left open would block the DROP below
    # forever, inside libpq, where pytest-timeout's signal never lands
    eng = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT",
                                   connect_args={"options": "-c lock_timeout=60s"})
    with eng.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{base}?options=-csearch_path%3D{schema}"
    finally:
        with eng.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
        eng.dispose()


MakeDb = Callable[[], api.Database]


@pytest.fixture
def make_db(db_url: str) -> Iterator[MakeDb]:
    """``make()`` opens one more engine Database on ``db_url`` (several stand
    for several engine workers); all are disposed after the test."""
    made: list[api.Database] = []
    migration.db_sync(db_url)  # what the operator runs before the engine starts

    def make() -> api.Database:
        db = api.Database(db_url)
        made.append(db)
        return db
    try:
        yield make
    finally:
        for db in made:
            db.dispose()
