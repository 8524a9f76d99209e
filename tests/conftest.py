"""Session-wide real services for the tests.

Redis: `REDIS_URL` when set, otherwise an embedded real redis-server started for the session.
Each test that asks for `redis_db_url` gets its own DB number, flushed before use, so tests
never see each other's keys.

Prefect: one real Prefect server for the whole session (`prefect_api`), on a temporary
SQLite database under a temporary PREFECT_HOME; only tests that ask for it pay its start-up.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

# Before anything imports prefect: a private home, no telemetry, no profile from the machine.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)

import pytest
import redis

from trading.config import Settings
from trading.redis_conn import redis_url

_db_numbers = itertools.cycle(range(1, 16))


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    with redis_url(Settings.from_env({"REDIS_URL": os.environ.get("REDIS_URL", "")})) as url:
        yield url


@pytest.fixture
def redis_db_url(redis_server_url: str) -> str:
    parts = urlsplit(redis_server_url)
    url = urlunsplit((parts.scheme, parts.netloc, f"/{next(_db_numbers)}", parts.query, parts.fragment))
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """The API URL of a real Prefect server that lives for the test session."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()
        assert url, "the Prefect test harness did not set an API URL"
        yield url
