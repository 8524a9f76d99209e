"""Every loop stops when cancelled (an operator's cancel in the Prefect UI), whatever it is doing.

Each of the seven loops (the production `run_*` functions, as `stack.py` starts them) is
cancelled `CYCLES_PER_LOOP` times at random moments, all loops side by side while one busy-loop
process per core loads the CPU:
- start-up: a random instant after the task was created;
- waiting for the lease: another holder has it, the loop polls with a long `lease_wait_s`;
- a Redis outage: the loop's own redis-server is paused (SIGSTOP), then cancelled;
- mid-batch: a feeder keeps appending input entries while the loop consumes them.

Every cancel must end the loop's task within `GRACE_S` (the stop-within-grace contract of
docs/runbooks.md, "Stopping a loop"). After the cancellations the feeders stop, each consumer
loop has one clean run until its group has acknowledged everything, and then nothing is lost or
double-processed: every input entry is acknowledged, nothing is dead-lettered, and each input's
output appears exactly once. Each loop has its own redis-server (stopped by PID), so pausing one
is an outage for that loop alone; the executor and PnL share one, PnL consuming what the executor
reports. The random moments come from a seeded generator; the seed is printed (set
`LOOP_CANCEL_SEED` to replay one).
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
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio

from tests.integration.conftest import SimHandle
from tests.integration.stack import caught_up, stack_settings
from trading.bus import (
    KEY_OPEN_INTENTS,
    ORDERS_EXECUTED,
    ORDERS_SHADOW,
    STREAM_BOOK,
    TRADING_EVENTS,
    dead_letter_stream,
    encode_entry,
)
from trading.clock import now_ms
from trading.config import Settings
from trading.execution.executor import run_executor
from trading.execution.paper import PaperVenue
from trading.ingest.candles import CandlesIngest
from trading.ingest.orderbook import OrderbookIngest
from trading.ingest.runner import run_ingest
from trading.ingest.ticker24h import Ticker24hIngest
from trading.lease import LEASE_KEY_PREFIX
from trading.loop import stop
from trading.orders import FINAL_STATUSES, Intent, intent_id_for
from trading.pnl_orchestrator import run_pnl
from trading.processes import free_port
from trading.redis_conn import EmbeddedRedis
from trading.signal_engine import run_signal_engine
from trading.trading_core import run_trading_core

pytestmark = pytest.mark.integration

GRACE_S = 10.0  # a cancelled loop's task has ended within this (Prefect kills the process after 30 s)
CYCLES_PER_LOOP = 20
SCENARIOS = ("startup", "lease", "outage", "mid-batch")
SETTLE_TIMEOUT_S = 60.0  # the final clean run acknowledges everything within this
SIGNALS = "signals:baseline"
WATCHDOG_S = 240.0  # the whole exercise (about 50 s here); below pytest's 300 s so that a hang shows its tasks


@dataclass
class LoopUnderTest:
    name: str  # its lease name
    redis: EmbeddedRedis
    start: Callable[[str, float], Coroutine[Any, Any, Any]]  # (redis url, lease_wait_s) -> the run_* coroutine
    group: tuple[str, str] | None = None  # (input stream, consumer group) of a consumer loop
    feed: Callable[[redis.asyncio.Redis, int], Coroutine[Any, Any, None]] | None = None  # append input number n
    stop_times: list[float] = field(default_factory=list)
    scenarios: Counter[str] = field(default_factory=Counter)


@contextlib.contextmanager
def cpu_load() -> Iterator[None]:
    """One busy-loop process per core, killed by PID afterwards."""
    busy = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()


@contextlib.contextmanager
def redis_servers(count: int) -> Iterator[list[EmbeddedRedis]]:
    servers: list[EmbeddedRedis] = []
    try:
        for _ in range(count):
            server = EmbeddedRedis()
            server.start()
            servers.append(server)
        yield servers
    finally:
        for server in servers:
            if server.pid is not None:
                os.kill(server.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            server.stop()


_pauses: Counter[int] = Counter()  # the executor and PnL share a server: one pause must not end the other's


@contextlib.contextmanager
def paused(server: EmbeddedRedis) -> Iterator[None]:
    """A Redis outage: the server is frozen (connections hang, nothing answers) until the block ends."""
    pid = server.pid
    assert pid is not None
    _pauses[pid] += 1
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        _pauses[pid] -= 1
        if not _pauses[pid]:
            os.kill(pid, signal.SIGCONT)


def outage_proof_client(server: EmbeddedRedis) -> redis.asyncio.Redis:
    """The test's own client: it outwaits an outage (a command sent meanwhile is answered after it)."""
    return redis.asyncio.Redis.from_url(server.url, decode_responses=True, socket_timeout=120)


# -- inputs ----------------------------------------------------------------------------------------

async def feed_book(client: redis.asyncio.Redis, n: int) -> None:
    bid, ask = (("99.99", "100.01"), ("100.99", "101.01"))[n % 2]  # mids alternate: every entry moves
    ts = now_ms()
    await client.xadd(STREAM_BOOK, encode_entry({"ts": ts, "recv_ts": ts, "market": "BTC-EUR", "nonce": n + 1,  # type: ignore[arg-type]
                                                 "bid": bid, "bid_size": "0.5", "ask": ask, "ask_size": "0.7"}))


async def feed_signal(client: redis.asyncio.Redis, n: int) -> None:
    await client.xadd(SIGNALS, encode_entry({  # type: ignore[arg-type]
        "ts": now_ms(), "signal_id": f"signal-{n}", "market": "BTC-EUR", "side": "buy", "strength": "0.8",
        "reason": "test", "ref_price": "74096.5", "spread_bps": "1.5", "volatility": "4.2", "strategy": "baseline"}))


def intent_uuid(n: int) -> str:
    return str(uuid.UUID(int=n + 1))


async def feed_intent(client: redis.asyncio.Redis, n: int) -> None:
    """What the trading core writes: the intent and its open-intent record, in one transaction."""
    intent = Intent(intent_id=intent_uuid(n), signal_id=str(uuid.uuid4()), market="BTC-EUR", side="buy",
                    order_type="market", time_in_force="IOC", dry_run=True, ts=now_ms(),
                    amount_quote=Decimal("10"))
    async with client.pipeline(transaction=True) as tx:
        tx.xadd(ORDERS_SHADOW, intent.encode())  # type: ignore[arg-type]
        tx.hset(KEY_OPEN_INTENTS, intent.intent_id,
                orjson.dumps({"market": "BTC-EUR", "side": "buy", "notional": "10", "ts": intent.ts}))
        await tx.execute()


# -- the loops -------------------------------------------------------------------------------------

def loops_under_test(settings: Settings, servers: list[EmbeddedRedis]) -> list[LoopUnderTest]:
    def ingest(handler: Callable[[], Any]) -> Callable[[str, float], Coroutine[Any, Any, Any]]:
        return lambda url, wait_s: run_ingest(handler(), settings, redis_url=url, metrics_port=free_port(),
                                              lease_wait_s=wait_s, universe_poll_s=1.0, gauge_interval_s=0.5)

    markets = settings.markets_or_default()
    shared = servers[6]  # the executor's reports are PnL's input
    return [
        LoopUnderTest("ingest:ticker24h", servers[0], ingest(Ticker24hIngest)),
        LoopUnderTest("ingest:orderbook", servers[1], ingest(OrderbookIngest)),
        LoopUnderTest("ingest:candles", servers[2], ingest(CandlesIngest)),
        LoopUnderTest("signal-engine", servers[3], lambda url, wait_s: run_signal_engine(
            settings, redis_url=url, metrics_port=free_port(), lease_wait_s=wait_s, gauge_interval_s=0.5),
            group=(STREAM_BOOK, "signal-engine"), feed=feed_book),
        LoopUnderTest("trading-core", servers[4], lambda url, wait_s: run_trading_core(
            settings, redis_url=url, metrics_port=free_port(), lease_wait_s=wait_s, gauge_interval_s=0.5),
            group=(SIGNALS, "trading-core"), feed=feed_signal),
        LoopUnderTest("executor", shared, lambda url, wait_s: run_executor(
            settings, redis_url=url, venue=PaperVenue.from_settings(settings, markets), metrics_port=free_port(),
            lease_wait_s=wait_s, poll_interval_s=0.2, gauge_interval_s=0.5, max_intent_age_s=3600),
            group=(ORDERS_SHADOW, "executor"), feed=feed_intent),
        LoopUnderTest("pnl", shared, lambda url, wait_s: run_pnl(
            settings, redis_url=url, metrics_port=free_port(), lease_wait_s=wait_s, mark_every_s=0.5,
            gauge_every_s=0.5), group=(ORDERS_EXECUTED, "pnl")),
    ]


# -- one cancellation ------------------------------------------------------------------------------

async def until(check: Callable[[], Coroutine[Any, Any, bool]], what: str, timeout_s: float = 30.0) -> None:
    """Poll `check` until it holds. The deadline is checked between polls too: redis-py sends each command
    under `asyncio.wait_for` (socket_timeout), which on Python 3.11 can drop the cancel of a timeout that
    lands as the send completes, and a lost cancel must not turn this into an endless poll."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                if await check():
                    return
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.02)


async def cancel_within_grace(loop: LoopUnderTest, task: asyncio.Task[Any], scenario: str) -> None:
    cancelled_at = time.monotonic()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=GRACE_S)
    if not done:
        stack = "".join(f"  {where}\n" for where in awaiting(task))
        raise AssertionError(f"{loop.name} ignored a cancel ({scenario}): still running {GRACE_S} s later at\n{stack}")
    loop.stop_times.append(time.monotonic() - cancelled_at)
    if not task.cancelled() and task.exception() is not None:
        # Cancelled before it held the lease or during the outage, a loop may end with the Redis error
        # it was handling; anything else is a bug that this test is not about: show it.
        error = task.exception()
        assert isinstance(error, (redis.RedisError, OSError)), f"{loop.name} ({scenario}) failed: {error!r}"


def awaiting(task: asyncio.Task[Any]) -> list[str]:
    """Where the task waits, outermost first (`Task.get_stack` shows only the outer frame)."""
    found, coroutine = [], task.get_coro()
    while coroutine is not None:
        frame = getattr(coroutine, "cr_frame", None)
        if frame is not None:
            found.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        coroutine = getattr(coroutine, "cr_await", None)
    return found


async def one_cancellation(loop: LoopUnderTest, client: redis.asyncio.Redis, rng: random.Random) -> None:
    scenario = rng.choice(SCENARIOS)
    loop.scenarios[scenario] += 1
    lease_key = LEASE_KEY_PREFIX + loop.name
    if scenario == "lease":
        await client.set(lease_key, orjson.dumps({"token": "other", "host": "elsewhere", "pid": 1,
                                                  "started_ms": now_ms()}), px=60_000)
    task = asyncio.create_task(loop.start(loop.redis.url, 60.0 if scenario == "lease" else 20.0),
                               name=f"{loop.name} ({scenario})")
    try:
        if scenario in ("outage", "mid-batch"):
            await until(lambda: _holds_lease(client, lease_key, task), f"{loop.name} holds its lease")
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        if scenario == "outage":
            with paused(loop.redis):
                await asyncio.sleep(rng.uniform(0.0, 1.0))
                await cancel_within_grace(loop, task, scenario)
        else:
            await cancel_within_grace(loop, task, scenario)
    finally:
        if not task.done():  # the test failed: do not leave it running
            task.cancel()
            await asyncio.wait({task}, timeout=GRACE_S)
    # A lease the loop could not release (Redis was down) expires by its TTL; the test does not wait.
    await client.delete(lease_key)


async def _holds_lease(client: redis.asyncio.Redis, lease_key: str, task: asyncio.Task[Any]) -> bool:
    if task.done():
        task.result()
        raise AssertionError(f"{task.get_name()} ended before it was cancelled")
    return bool(await client.exists(lease_key))


# -- the final clean run and the exactly-once checks ---------------------------------------------------

async def settle(loop: LoopUnderTest, client: redis.asyncio.Redis) -> None:
    """Run the loop cleanly until its group has acknowledged every entry, then cancel it."""
    assert loop.group is not None
    stream, group = loop.group
    task = asyncio.create_task(loop.start(loop.redis.url, 20.0), name=f"{loop.name} (final)")
    try:
        await until(lambda: _all_acked(client, stream, group, task), f"{loop.name} acknowledged all of {stream}",
                    SETTLE_TIMEOUT_S)
        await cancel_within_grace(loop, task, "final")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=GRACE_S)


async def _all_acked(client: redis.asyncio.Redis, stream: str, group: str, task: asyncio.Task[Any]) -> bool:
    """Nothing pending and the group has been handed the stream's last entry (the stream may still grow)."""
    if task.done():
        task.result()
        raise AssertionError(f"{task.get_name()} ended before it was cancelled")
    return await caught_up(client, stream, group)


async def check_exactly_once(loop: LoopUnderTest, client: redis.asyncio.Redis, fed: int) -> None:
    assert loop.group is not None
    stream, _group = loop.group
    dead = [fields.get("reason") for _, fields in await client.xrange(dead_letter_stream(stream), count=3)]
    assert not dead, f"{loop.name} dead-lettered entries: {dead}"
    if loop.feed is not None:
        # The feeder may be cancelled after its XADD reached Redis but before it counted it: the stream knows.
        written = await client.xlen(stream)
        assert written in (fed, fed + 1), f"{loop.name}: {written} entries for {fed} feeds"
        fed = written
    if loop.name == "signal-engine":
        signal_ids = [fields["signal_id"] for _, fields in await client.xrange(SIGNALS)]
        assert signal_ids, "the signal engine produced no signal"
        assert not _repeated(signal_ids), f"signals emitted twice: {_repeated(signal_ids)}"
    elif loop.name == "trading-core":
        decided = [fields.get("intent_id") for _, fields in await client.xrange(TRADING_EVENTS)
                   if fields.get("type") in ("intent", "reject", "kill_switch")]
        assert Counter(decided) == Counter(intent_id_for(f"signal-{n}") for n in range(fed)), \
            "a signal was not decided exactly once"
    elif loop.name == "executor":
        final = [fields["intent_id"] for _, fields in await client.xrange(ORDERS_EXECUTED)
                 if fields["status"] in FINAL_STATUSES]
        assert Counter(final) == Counter(intent_uuid(n) for n in range(fed)), \
            "an intent did not get exactly one final report"


def _repeated(values: list[str]) -> list[str]:
    return [value for value, count in Counter(values).items() if count > 1]


# -- the test --------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def feeding(loop: LoopUnderTest, client: redis.asyncio.Redis) -> AsyncIterator[list[int]]:
    """Append one input entry every 20 ms until the block ends; yields [how many were appended]."""
    fed = [0]

    async def run() -> None:
        assert loop.feed is not None
        while True:
            await loop.feed(client, fed[0])
            fed[0] += 1
            await asyncio.sleep(0.02)

    if loop.feed is None:
        yield fed
        return
    feeder = asyncio.create_task(run(), name=f"feed {loop.name}")
    try:
        yield fed
    finally:
        await stop([feeder])  # cancels again while it runs: redis-py's wait_for may lose a cancel (see `until`)


async def exercise(loop: LoopUnderTest, rng: random.Random) -> None:
    client = outage_proof_client(loop.redis)
    try:
        if loop.group is not None:  # from the first entry on, whatever the loop's own start position
            stream, group = loop.group
            with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: the shared server has it already
                await client.xgroup_create(stream, group, id="0", mkstream=True)
        async with feeding(loop, client) as fed:
            for _ in range(CYCLES_PER_LOOP):
                await one_cancellation(loop, client, rng)
        if loop.group is not None:
            await settle(loop, client)
            await check_exactly_once(loop, client, fed[0])
    finally:
        await client.aclose()


async def exercise_all(loops: list[LoopUnderTest], rngs: dict[str, random.Random]) -> None:
    async with asyncio.TaskGroup() as group:
        for loop in loops:
            group.create_task(exercise(loop, rngs[loop.name]), name=loop.name)


async def within_watchdog(work: Coroutine[Any, Any, None], limit_s: float) -> None:
    """Run `work`; if it is not done within `limit_s`, fail showing where every task waits (pytest-timeout
    would show only threads, and the event loop's thread is always in its selector)."""
    task = asyncio.create_task(work, name="all loops")
    done, _ = await asyncio.wait({task}, timeout=limit_s)
    if done:
        task.result()
        return
    stacks = "".join(f"{other.get_name()}:\n" + "".join(f"  {where}\n" for where in awaiting(other))
                     for other in asyncio.all_tasks() if other is not asyncio.current_task())
    task.cancel()
    await asyncio.wait({task}, timeout=GRACE_S)
    raise AssertionError(f"the loops' cancellations were not done within {limit_s} s; every task:\n{stacks}")


async def test_every_loop_stops_within_its_grace_period_and_loses_nothing(sim: SimHandle, tmp_path: Path) -> None:
    seed = int(os.environ.get("LOOP_CANCEL_SEED") or random.SystemRandom().randrange(2**32))
    print(f"LOOP_CANCEL_SEED={seed}")
    with redis_servers(7) as servers, cpu_load():
        settings = stack_settings(sim, servers[0].url, tmp_path / "lake", INGEST_MARKETS="BTC-EUR",
                                  MARKET_COOLDOWN_MS="0", MAX_OPEN_INTENTS="100000",
                                  # hundreds of 10 EUR buys, never sold: the executor's own limits must not bite
                                  MAX_EXPOSURE_PER_MARKET_EUR="1000000", MAX_EXPOSURE_TOTAL_EUR="1000000")
        loops = loops_under_test(settings, servers)
        # Executor first: PnL's input is the executor's output, so it settles after the executor.
        rngs = {loop.name: random.Random(f"{seed}:{loop.name}") for loop in loops}
        started = time.monotonic()
        await within_watchdog(exercise_all(loops, rngs), WATCHDOG_S)
        for loop in loops:
            print(f"{loop.name}: {len(loop.stop_times)} stops, slowest {max(loop.stop_times):.2f} s, "
                  f"scenarios {dict(loop.scenarios)}")
        print(f"all loops: {time.monotonic() - started:.1f} s")
        for loop in loops:
            assert len(loop.stop_times) >= CYCLES_PER_LOOP
