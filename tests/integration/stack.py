"""The whole dry-run stack in one test process: ingest → signal engine → trading core → executor → pnl.

Every loop is the production `run_*` function on the simulator and a real Redis, each on its
own free metrics port, under its lease, until the context exits (cancelled like a Prefect
cancel; a loop still running after its grace period fails the test). Tests use it for the
end-to-end chain and preflight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio

from tests.integration.conftest import SimHandle
from trading.bus import as_text
from trading.config import Settings
from trading.execution.executor import run_executor
from trading.execution.paper import PaperVenue
from trading.ingest.orderbook import OrderbookIngest
from trading.ingest.runner import run_ingest
from trading.ingest.ticker24h import Ticker24hIngest
from trading.lease import LEASE_KEY_PREFIX
from trading.loop import STOP_GRACE_S
from trading.ops_metrics import run_ops_exporter
from trading.pnl_orchestrator import run_pnl
from trading.processes import free_port
from trading.redis_conn import async_client
from trading.signal_engine import run_signal_engine
from trading.trading_core import run_trading_core

LOOPS = ("ingest:ticker24h", "ingest:orderbook", "signal-engine", "trading-core", "executor", "pnl")
ALL_LOOPS = (*LOOPS, "ops-metrics")  # every loop `running_stack` can run



def stack_settings(sim: SimHandle, redis_url: str, lake: Path, **env: str) -> Settings:
    """Settings for a stack on `sim`: thresholds low enough that the simulator's quiet books make signals."""
    values = {"REDIS_URL": redis_url, "PARQUET_DIR": str(lake), "INGEST_MARKETS": "BTC-EUR,ETH-EUR",
              "BITVAVO_REST_URL": sim.rest_url, "BITVAVO_WS_URL": sim.ws_url, "SIGNAL_MIN_VOLATILITY_BPS": "0.05",
              "SIGNAL_MAX_SPREAD_BPS": "200", "MARKET_COOLDOWN_MS": "500", "ORDER_NOTIONAL_EUR": "50"}
    values.update(env)
    return Settings.from_env(values)


@dataclass
class Stack:
    settings: Settings
    redis_url: str
    client: redis.asyncio.Redis
    ports: dict[str, int]
    tasks: dict[str, asyncio.Task[Any]] = field(default_factory=dict)

    async def stop_loop(self, name: str) -> None:
        """Cancel one loop (an operator's cancel) and wait until its lease is gone."""
        await stop_tasks({name: self.tasks.pop(name)})
        assert not await self.client.exists(LEASE_KEY_PREFIX + name)

    async def wait_until_running(self, timeout_s: float = 30.0) -> None:
        """Every loop holds its lease (it got past start-up) and no loop died."""
        async with asyncio.timeout(timeout_s):
            while True:
                for name, task in self.tasks.items():
                    if task.done():
                        task.result()  # raises the loop's error
                        raise AssertionError(f"loop {name} ended early")
                held = [await self.client.exists(LEASE_KEY_PREFIX + name) for name in self.tasks]
                if all(held):
                    return
                await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def running_stack(settings: Settings, redis_url: str, *, loops: tuple[str, ...] = LOOPS,
                        signal_options: Mapping[str, Any] | None = None) -> AsyncIterator[Stack]:
    client = async_client(redis_url)
    stack = Stack(settings, redis_url, client, {name: free_port() for name in loops})
    coroutines: dict[str, Coroutine[Any, Any, Any]] = {
        "ingest:ticker24h": run_ingest(Ticker24hIngest(), settings, redis_url=redis_url,
                                       metrics_port=stack.ports.get("ingest:ticker24h", 0), universe_poll_s=1.0,
                                       gauge_interval_s=0.5),
        "ingest:orderbook": run_ingest(OrderbookIngest(), settings, redis_url=redis_url,
                                       metrics_port=stack.ports.get("ingest:orderbook", 0), universe_poll_s=1.0,
                                       gauge_interval_s=0.5),
        "signal-engine": run_signal_engine(settings, redis_url=redis_url, metrics_port=stack.ports.get(
            "signal-engine", 0), gauge_interval_s=0.5, **dict(signal_options or {})),
        "trading-core": run_trading_core(settings, redis_url=redis_url,
                                         metrics_port=stack.ports.get("trading-core", 0), gauge_interval_s=0.5),
        "executor": run_executor(settings, redis_url=redis_url,
                                 venue=PaperVenue.from_settings(settings, settings.markets_or_default()),
                                 metrics_port=stack.ports.get("executor", 0), poll_interval_s=0.2,
                                 gauge_interval_s=0.5),
        "pnl": run_pnl(settings, redis_url=redis_url, metrics_port=stack.ports.get("pnl", 0), mark_every_s=0.5,
                       gauge_every_s=0.5),
        "ops-metrics": run_ops_exporter(settings, redis_url=redis_url, metrics_port=stack.ports.get("ops-metrics", 0),
                                        interval_s=0.5),
    }
    for name, coroutine in coroutines.items():
        if name in loops:
            stack.tasks[name] = asyncio.create_task(coroutine, name=name)
        else:
            coroutine.close()
    try:
        yield stack
    finally:
        try:
            await stop_tasks(stack.tasks)
        finally:
            await client.aclose()


async def stop_tasks(tasks: Mapping[str, asyncio.Task[Any]], *, grace_s: float = STOP_GRACE_S) -> None:
    """Cancel the loops once, as an operator's cancel does, and fail naming any loop that has not ended
    within its grace period (trading/loop.py: a cancelled loop ends within `STOP_GRACE_S`). Such a
    loop is cancelled again and waited for a while more, only so that it does not outlive the test."""
    pending = {task: name for name, task in tasks.items() if not task.done()}
    for task in pending:
        task.cancel()
    ignored: set[asyncio.Task[Any]] = set()
    if pending:
        _done, ignored = await asyncio.wait(pending, timeout=grace_s)
    for task in ignored:
        task.cancel()
    if ignored:
        await asyncio.wait(ignored, timeout=grace_s)
    for task in tasks.values():
        if task.done() and not task.cancelled():
            with contextlib.suppress(Exception):
                task.result()  # consumed: a loop's own failure was already reported by the test's waits
    assert not ignored, f"loops still running {grace_s} s after a cancel: {sorted(pending[t] for t in ignored)}"


async def caught_up(client: Any, stream: str, group: str) -> bool:
    """The group was handed the stream's last entry and acknowledged everything (the stream may still grow)."""
    last = await client.xrevrange(stream, count=1)
    last_id = as_text(last[0][0]) if last else "0-0"
    for info in await client.xinfo_groups(stream):
        if as_text(info["name"]) == group:
            return int(info["pending"]) == 0 and as_text(info["last-delivered-id"]) == last_id
    return False
