"""Session-wide real services for the tests.

Redis: `REDIS_URL` when set, otherwise an embedded real redis-server started for the session.
Each test that asks for `redis_db_url` gets its own DB number, flushed before use, so tests
never see each other's keys.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

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
