"""Fixtures for every test: a face cache of the test run's own, shared by its tests and the
processes they start, so no test reads or fills the user's cache."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def face_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("face-cache")
    before = os.environ.get("FACEID_CACHE_DIR")
    os.environ["FACEID_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("FACEID_CACHE_DIR", None)
    else:
        os.environ["FACEID_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (tests/postgres_server.py); skips without one."""
    from postgres_server import PostgresServer

    try:
        server = PostgresServer()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres) -> str:
    """The URL of a new, empty PostgreSQL database of this test's own."""
    return postgres.new_database()
