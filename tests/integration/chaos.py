"""A chaos run in live mode against the simulator: the faults a live stack meets, one by one and together.

The whole stack runs: ingest (ticker24h, orderbook), signal engine, trading core and PnL in this
process, the live executor in its own process (tests/integration/chaos_executor.py) so that it
can be SIGKILLed mid-call, Redis as an embedded server with AOF so that it can be SIGKILLed and
come back with its data. A feeder adds buy and sell signals at the current mid, so orders flow
all the time. Phases, each `phase_s` long:

1. `rest`: 5xx and hung order calls, executed by the exchange or not;
2. `feed`: WebSocket connections dropped, a nonce skipped;
3. `executor`: the executor SIGKILLed while it sends, and started again;
4. `redis`: Redis SIGKILLed and restarted (AOF) while everything runs;
5. `malformed`: off-contract entries written to signals, orders:shadow and orders:executed;
6. `kill_switch`: the kill switch on for a while, then off;
7. `together`: all of the above at once.

Then the feeder stops, the stack settles, and `ChaosResult` holds what the checks need: the
exchange's orders and fills (from the simulator), the live ledger rebuilt from orders:executed,
the malformed entries and where they ended, the kill switch's window, and which loops still run.
`make chaos` runs it longer (CHAOS_PHASE_S).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio

from tests.integration.conftest import REPO_ROOT, SimHandle
from tests.integration.stack import running_stack, stack_settings
from trading.bus import (
    KEY_KILL,
    KEY_OPEN_INTENTS,
    ORDERS_EXECUTED,
    ORDERS_SHADOW,
    STREAM_BOOK,
    dead_letter_stream,
    decode_entry,
    encode_entry,
)
from trading.clock import now_ms
from trading.config import Settings
from trading.exchange.governor import RateGovernor
from trading.exchange.rest import BitvavoRest
from trading.golive import record_decision
from trading.lease import LEASE_KEY_PREFIX
from trading.loop import stop
from trading.pnl import Ledger
from trading.pnl_orchestrator import rebuild_from_stream
from trading.processes import stop_process
from trading.redis_conn import EmbeddedRedis, async_client

MARKETS = ("BTC-EUR", "ETH-EUR")
IN_PROCESS_LOOPS = ("ingest:ticker24h", "ingest:orderbook", "signal-engine", "trading-core", "pnl")
ALL_LOOPS = (*IN_PROCESS_LOOPS, "executor")
PHASES = ("rest", "feed", "executor", "redis", "malformed", "kill_switch", "together")
SIGNALS_PER_S = 6


@dataclass
class ChaosResult:
    orders: list[dict[str, Any]]  # every order of the account at the exchange (GET /orders)
    exchange_fill_ids: set[str]  # every fill of the account at the exchange (GET /trades)
    live_ledger: Ledger  # rebuilt from orders:executed
    executed_fill_ids: list[str]  # every fill id in orders:executed reports, repeats included
    malformed: dict[str, list[str]]  # stream -> marker of each off-contract entry written to it
    dead: dict[str, dict[str, str]]  # stream -> marker -> dead-letter reason
    refused_markers: set[str]  # malformed intents the executor refused with an event instead
    kill_windows: list[tuple[int, int]]  # (switched on, switched off) in exchange ms
    loops_running: dict[str, bool]
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class _Executor:
    env: dict[str, str]
    log_dir: Path
    process: subprocess.Popen[bytes] | None = None
    kills: int = 0
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log_dir / f"executor-{self.starts}.log", "wb") as log:  # the child keeps its own handle
            self.process = subprocess.Popen([sys.executable, "-m", "tests.integration.chaos_executor"],
                                            cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def kill(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.kills += 1

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout_s=15)


def chaos_settings(sim: SimHandle, redis_url: str, lake: Path) -> Settings:
    return stack_settings(sim, redis_url, lake, DRY_RUN="false", BITVAVO_API_KEY=sim.api_key,
                          BITVAVO_API_SECRET=sim.api_secret, BITVAVO_OPERATOR_ID="4242",
                          BITVAVO_ACCESS_WINDOW_MS="3000", INGEST_MARKETS=",".join(MARKETS),
                          MARKET_COOLDOWN_MS="0", ORDER_NOTIONAL_EUR="20", MAX_OPEN_INTENTS="1000",
                          MAX_EXPOSURE_PER_MARKET_EUR="1000000", MAX_EXPOSURE_TOTAL_EUR="1000000",
                          STALE_BOOK_MS="10000")


def _env(settings: Settings, sim: SimHandle, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"REDIS_URL": redis_url, "PARQUET_DIR": str(settings.parquet_dir), "DRY_RUN": "false",
                "BITVAVO_REST_URL": sim.rest_url, "BITVAVO_WS_URL": sim.ws_url, "BITVAVO_API_KEY": sim.api_key,
                "BITVAVO_API_SECRET": sim.api_secret, "BITVAVO_OPERATOR_ID": "4242",
                "BITVAVO_ACCESS_WINDOW_MS": "3000", "INGEST_MARKETS": ",".join(MARKETS),
                "MAX_EXPOSURE_PER_MARKET_EUR": "1000000", "MAX_EXPOSURE_TOTAL_EUR": "1000000"})
    return env


async def _mid(client: Any, market: str) -> Decimal | None:
    for _id, raw in await client.xrevrange(STREAM_BOOK, count=50):
        fields = decode_entry(raw)
        if fields.get("market") == market and fields.get("bid") and fields.get("ask"):
            mid: Decimal = (fields["bid"] + fields["ask"]) / 2
            return mid
    return None


async def _feed_signals(client: Any, signal_stream: str, rng: random.Random, counts: dict[str, int]) -> None:
    """Buy and sell signals at the book's mid, `SIGNALS_PER_S` a second; Redis away is skipped."""
    while True:
        await asyncio.sleep(1 / SIGNALS_PER_S)
        market = rng.choice(MARKETS)
        with contextlib.suppress(redis.RedisError, OSError):
            mid = await _mid(client, market)
            if mid is None:
                continue
            side = "buy" if rng.random() < 0.55 else "sell"
            await client.xadd(signal_stream, encode_entry({
                "ts": now_ms(), "signal_id": f"chaos-{uuid.uuid4()}", "market": market, "side": side,
                "strength": "0.5", "reason": "chaos", "ref_price": mid, "spread_bps": "2", "volatility": "5",
                "strategy": "chaos"}))
            counts["signals"] = counts.get("signals", 0) + 1


async def _write_malformed(client: Any, signal_stream: str, malformed: dict[str, list[str]]) -> None:
    marker = f"junk-{uuid.uuid4()}"
    entries = {
        signal_stream: {"v": "1", "ts": str(now_ms()), "signal_id": marker, "market": "BTC-EUR", "side": "hold",
                        "ref_price": "abc", "spread_bps": "1"},
        ORDERS_SHADOW: {"v": "1", "ts": str(now_ms()), "intent_id": marker, "signal_id": marker,
                        "market": "FOO-EUR", "side": "buy", "order_type": "limit", "amount": "1e40",
                        "price": "1e400", "time_in_force": "IOC", "dry_run": "false"},
        ORDERS_EXECUTED: {"v": "1", "ts": str(now_ms()), "intent_id": marker, "order_id": "x", "market": "BTC-EUR",
                          "side": "buy", "status": "filled", "filled_amount": "NaN", "fills": "[]"},
    }
    for stream, fields in entries.items():
        with contextlib.suppress(redis.RedisError, OSError):
            await client.xadd(stream, fields)
            malformed.setdefault(stream, []).append(marker)


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if await check():
                return True
        await asyncio.sleep(0.2)
    return False


@contextlib.asynccontextmanager
async def _background(coroutine: Awaitable[None]) -> AsyncIterator[None]:
    task = asyncio.ensure_future(coroutine)
    try:
        yield
    finally:
        await stop([task])  # cancels again while it runs: a cancel lost in a library must not hang the test
        if not task.cancelled():
            task.exception()  # retrieved, as gather(return_exceptions=True) did: the run's own checks judge it


async def run_chaos(sim: SimHandle, tmp_path: Path, *, phase_s: float, seed: int) -> ChaosResult:
    rng = random.Random(seed)
    server = EmbeddedRedis(data_dir=tmp_path / "redis")
    server.start()
    settings = chaos_settings(sim, server.url, tmp_path / "lake")
    executor = _Executor(_env(settings, sim, server.url), tmp_path)
    client = async_client(server.url)
    counts: dict[str, int] = {}
    malformed: dict[str, list[str]] = {}
    kill_windows: list[tuple[int, int]] = []
    rest = BitvavoRest(sim.rest_url, api_key=settings.bitvavo_api_key, api_secret=settings.bitvavo_api_secret,
                       operator_id=4242, governor=RateGovernor())
    try:
        await record_decision(client, decision="GO", operator="chaos", reason="chaos run", decided_ms=now_ms(),
                              valid_for_ms=3_600_000)
        executor.start()
        async with running_stack(settings, server.url, loops=IN_PROCESS_LOOPS) as stack:
            await stack.wait_until_running(timeout_s=60)
            async with _background(_feed_signals(client, settings.signal_stream, rng, counts)):
                for phase in PHASES:
                    await _phase(phase, phase_s, sim=sim, server=server, client=client, executor=executor,
                                 signal_stream=settings.signal_stream, malformed=malformed,
                                 kill_windows=kill_windows, rng=rng, counts=counts)
            sim.control(clear=True)
            # Settle: every open intent final and booked (the executor and PnL have caught up).
            settled = await _until(lambda: _async_eq(client.hlen(KEY_OPEN_INTENTS), 0), 60)
            counts["settled"] = int(settled)
            loops_running = {name: not task.done() for name, task in stack.tasks.items()}
            loops_running["executor"] = executor.alive()
            for name in ALL_LOOPS:
                loops_running[name] = loops_running.get(name, False) and bool(
                    await client.exists(LEASE_KEY_PREFIX + name))
            result = await _collect(client, rest, malformed, kill_windows, loops_running, counts)
            result.counts["executor_kills"] = executor.kills
        return result
    finally:
        executor.stop()
        rest.close()
        await client.aclose()
        server.stop()


async def _async_eq(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def _phase(phase: str, phase_s: float, *, sim: SimHandle, server: EmbeddedRedis, client: Any,
                 executor: _Executor, signal_stream: str, malformed: dict[str, list[str]],
                 kill_windows: list[tuple[int, int]], rng: random.Random, counts: dict[str, int]) -> None:
    deadline = time.monotonic() + phase_s
    together = phase == "together"
    if phase == "kill_switch":
        await asyncio.sleep(phase_s / 3)
        await client.set(KEY_KILL, "1")
        switched_on = now_ms()
        await asyncio.sleep(phase_s / 3)
        await client.delete(KEY_KILL)
        kill_windows.append((switched_on, now_ms()))
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        return
    if phase == "redis":
        await asyncio.sleep(phase_s / 3)
        server.kill()
        counts["redis_kills"] = counts.get("redis_kills", 0) + 1
        await asyncio.sleep(2.0)
        server.start()
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        return
    while time.monotonic() < deadline:
        if phase == "rest" or (together and rng.random() < 0.5):
            execute = rng.random() < 0.5
            if rng.random() < 0.5:
                sim.fail_next(1, error_code=101, execute=execute)
            else:
                sim.hang_next(1, seconds=1.5, execute=execute)
            counts["rest_faults"] = counts.get("rest_faults", 0) + 1
        if phase == "feed" or (together and rng.random() < 0.3):
            if rng.random() < 0.5:
                sim.drop_connections()
            else:
                sim.skip_nonce(rng.choice(MARKETS))
            counts["feed_faults"] = counts.get("feed_faults", 0) + 1
        if phase == "malformed" or (together and rng.random() < 0.3):
            await _write_malformed(client, signal_stream, malformed)
        if phase == "executor" or (together and rng.random() < 0.15):
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            executor.kill()
            executor.start()
        await asyncio.sleep(rng.uniform(0.5, 1.5))


async def _collect(client: Any, rest: BitvavoRest, malformed: dict[str, list[str]],
                   kill_windows: list[tuple[int, int]], loops_running: dict[str, bool],
                   counts: dict[str, int]) -> ChaosResult:
    orders: list[dict[str, Any]] = []
    fills: set[str] = set()
    for market in MARKETS:
        orders += [{"market": market, "orderId": o.order_id, "clientOrderId": o.client_order_id, "created": o.created}
                   for o in await asyncio.to_thread(rest.orders, market, limit=1000)]
        fills |= {str(row["id"]) for row in await asyncio.to_thread(rest.trades, market, limit=1000)}
    replay = await rebuild_from_stream(client)
    executed_fill_ids = [fill.get("fill_id", "") for _id, raw in await client.xrange(ORDERS_EXECUTED)
                         for fill in (decode_entry(raw).get("fills") or []) if isinstance(fill, dict)]
    dead: dict[str, dict[str, str]] = {}
    for stream in malformed:
        for _id, raw in await client.xrange(dead_letter_stream(stream)):
            record = decode_entry(raw)
            fields = record.get("fields") or {}
            if isinstance(fields, str):
                fields = orjson.loads(fields)
            marker = (fields.get("signal_id") or fields.get("intent_id")) if isinstance(fields, dict) else None
            if marker:
                dead.setdefault(stream, {})[str(marker)] = str(record.get("reason", ""))
    refused = {str(e.get("intent_id")) for _id, raw in await client.xrange("trading:events")
               for e in [decode_entry(raw)] if e.get("type") in ("intent_refused_by_executor",)}
    counts.update(orders=len(orders), exchange_fills=len(fills), reports=await client.xlen(ORDERS_EXECUTED),
                  still_open=await client.hlen(KEY_OPEN_INTENTS))
    events = Counter(decode_entry(raw).get("type") for _id, raw in await client.xrange("trading:events"))
    counts.update({f"event:{name}": n for name, n in events.items()})
    return ChaosResult(orders=orders, exchange_fill_ids=fills, live_ledger=replay.ledgers.live,
                       executed_fill_ids=executed_fill_ids, malformed=malformed, dead=dead,
                       refused_markers=refused, kill_windows=kill_windows, loops_running=loops_running,
                       counts=counts)
