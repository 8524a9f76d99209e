"""The executor loop with the paper venue, on real Redis and the simulator's live book.

Intents are XADDed to `orders:shadow` (and registered in `trading:intents:open`) the way the
trading core does it; the executor's paper venue mirrors the simulator's book over its own
WebSocket, exactly as it would mirror Bitvavo's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio
from pydantic import SecretStr

from tests.integration.conftest import SimHandle
from trading.bus import (
    KEY_OPEN_INTENTS,
    ORDERS_EXECUTED,
    ORDERS_SHADOW,
    dead_letter_stream,
    decode_entry,
    pnl_key,
)
from trading.clock import now_ms
from trading.config import Settings
from trading.decimals import ceil_to, floor_to
from trading.events import read_events
from trading.exchange.rest import BitvavoRest
from trading.execution.executor import LAKE_CHANNEL, ExecutorSummary, run_executor
from trading.execution.paper import KEY_PAPER_OPEN, RESTART_REASON, PaperVenue
from trading.kill_switch import set_kill_switch
from trading.lake import LakeWriteError, LakeWriter, channel_files, read_jsonl, utc_day
from trading.orders import ExecutionReport, Intent
from trading.pnl_orchestrator import rebuild_from_lake, rebuild_from_stream
from trading.processes import free_port
from trading.redis_conn import async_client

pytestmark = pytest.mark.integration

D = Decimal
MARKETS = ("BTC-EUR", "ETH-EUR")
RICH = {"EUR": D("1000000"), "BTC": D("2")}
TAKER = D("0.0025")
UNLIMITED = D("1e12")


def _settings(sim: SimHandle, tmp_path: Path) -> Settings:
    # Orders here walk whole book levels: the executor's hard limits sit above them (test_executor_checks.py
    # tests the limits themselves).
    return Settings(parquet_dir=tmp_path / "lake", ingest_markets=MARKETS, bitvavo_rest_url=sim.rest_url,
                    bitvavo_ws_url=sim.ws_url, max_notional_per_order=UNLIMITED, max_exposure_per_market=UNLIMITED,
                    max_exposure_total=UNLIMITED)



class ProcessDeath(BaseException):
    """Stands for the process dying: nothing in the loop catches it."""


class DiesAfterSubmitting(PaperVenue):
    """Fault injection: the order is placed, then the process dies before its transaction commits."""

    def __init__(self, doomed: str, **options: Any) -> None:
        super().__init__(**options)
        self.doomed = doomed

    async def submit(self, intent: Intent) -> list[ExecutionReport]:
        reports = await super().submit(intent)
        if intent.intent_id == self.doomed:
            raise ProcessDeath("killed between the venue and the commit")
        return reports


def _venue(settings: Settings, **options: Any) -> PaperVenue:
    options.setdefault("balances", RICH)
    return PaperVenue.from_settings(settings, MARKETS, **options)


@asynccontextmanager
async def _executor(settings: Settings, url: str, venue: PaperVenue, **options: Any
                    ) -> AsyncIterator[asyncio.Task[ExecutorSummary]]:
    options.setdefault("metrics_port", free_port())
    task = asyncio.create_task(run_executor(settings, redis_url=url, venue=venue, poll_interval_s=0.05,
                                            gauge_interval_s=0.1, **options))
    try:
        await _until(lambda: _async(all(venue.book_live(m) for m in MARKETS) or task.done()), timeout_s=10)
        yield task
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _async(value: bool) -> bool:
    return value


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.02)


def _intent(market: str = "BTC-EUR", side: str = "buy", order_type: str = "market", tif: str = "IOC", *,
            amount: Decimal | None = None, amount_quote: Decimal | None = None, price: Decimal | None = None,
            dry_run: bool = True, ts: int | None = None) -> Intent:
    return Intent(intent_id=str(uuid.uuid4()), signal_id=str(uuid.uuid4()), market=market, side=side,  # type: ignore[arg-type]
                  order_type=order_type, time_in_force=tif, dry_run=dry_run,  # type: ignore[arg-type]
                  ts=now_ms() if ts is None else ts, amount=amount, amount_quote=amount_quote, price=price)


async def _send(client: redis.asyncio.Redis, *intents: Intent) -> None:
    """What the trading core does: the intent and its open-intent record in one transaction."""
    for intent in intents:
        async with client.pipeline(transaction=True) as tx:
            tx.xadd(ORDERS_SHADOW, intent.encode())  # type: ignore[arg-type]
            tx.hset(KEY_OPEN_INTENTS, intent.intent_id,
                    orjson.dumps({"market": intent.market, "side": intent.side, "notional": "10",
                                  "amount": str(intent.amount or 0), "ts": intent.ts}))
            await tx.execute()


async def _holds(client: redis.asyncio.Redis, market: str, amount: Decimal) -> None:
    """The paper ledger holds `amount` of `market` (as the PnL loop writes it): paper sells of it are allowed."""
    await client.hset(pnl_key(True), mapping={f"{market}:position": str(amount), "updated_ts": str(now_ms())})


async def _reports(client: redis.asyncio.Redis) -> list[ExecutionReport]:
    return [ExecutionReport.decode(fields) for _id, fields in await client.xrange(ORDERS_EXECUTED)]


async def _wait_reports(client: redis.asyncio.Redis, count: int) -> list[ExecutionReport]:
    await _until(lambda: _count(client, ORDERS_EXECUTED, count))
    return await _reports(client)


async def _count(client: redis.asyncio.Redis, stream: str, at_least: int) -> bool:
    return bool(await client.xlen(stream) >= at_least)


async def _pending_is(client: redis.asyncio.Redis, count: int) -> bool:
    """`count` entries pending and every entry delivered (Redis 6.2 has no `lag` field)."""
    groups = await client.xinfo_groups(ORDERS_SHADOW)
    [(last_id, _)] = await client.xrevrange(ORDERS_SHADOW, count=1)
    return bool(groups) and groups[0]["pending"] == count and groups[0]["last-delivered-id"] == last_id


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
    return text


async def test_intents_fill_against_the_live_book_and_reports_follow_the_contract(
        sim: SimHandle, redis_db_url: str, tmp_path: Path) -> None:
    settings = _settings(sim, tmp_path)
    client = async_client(redis_db_url)
    sim.pause_feed()  # a still book: the fills can be checked against it level by level
    rest = BitvavoRest(sim.rest_url)
    try:
        nonce_before = sim.stats()["markets"]["BTC-EUR"]["nonce"]
        book = rest.book("BTC-EUR")
        asks, bids = book.asks[:3], book.bids[:3]
        half = floor_to(asks[2][1] / 2, 8)
        buy = _intent(amount=asks[0][1] + asks[1][1] + half)  # market buy through two levels into a third
        sell = _intent(side="sell", order_type="limit", amount=bids[0][1] + bids[1][1] + D("0.5"),
                       price=bids[1][0])  # IOC limit: two levels, then the limit stops it
        await _holds(client, "BTC-EUR", sell.amount or D(0))
        async with _executor(settings, redis_db_url, _venue(settings)):
            await _send(client, buy, sell)
            bought, sold = await _wait_reports(client, 2)
        assert sim.stats()["markets"]["BTC-EUR"]["nonce"] == nonce_before  # the book did not move meanwhile

        assert bought.intent_id == buy.intent_id and bought.status == "filled" and bought.order_id
        assert [(f.price, f.amount) for f in bought.fills] == [asks[0], asks[1], (asks[2][0], half)]
        gross = sum((p * a for p, a in [asks[0], asks[1], (asks[2][0], half)]), D(0))
        assert bought.filled_amount == buy.amount and bought.filled_amount_quote == gross
        assert bought.fee == ceil_to(gross * (1 + TAKER), 2) - gross and all(f.taker for f in bought.fills)

        assert sold.status == "canceled" and sold.reason == "canceledIOC"
        assert [(f.price, f.amount) for f in sold.fills] == [bids[0], bids[1]]
        sold_gross = bids[0][0] * bids[0][1] + bids[1][0] * bids[1][1]
        assert sold.fee == sold_gross - floor_to(sold_gross * (1 - TAKER), 2)
        assert len({f.fill_id for f in bought.fills + sold.fills}) == 5

        # The exact contract fields of orders:executed.
        [(_, raw_buy), (_, raw_sell)] = await client.xrange(ORDERS_EXECUTED)
        assert set(raw_buy) == {"v", "ts", "intent_id", "order_id", "market", "side", "status", "filled_amount",
                                "filled_amount_quote", "avg_price", "fee", "fee_currency", "dry_run", "fills"}
        assert set(raw_sell) == set(raw_buy) | {"reason"}
        assert raw_buy["dry_run"] == "true" and raw_buy["fee_currency"] == "EUR" and raw_buy["side"] == "buy"
        assert buy.amount is not None and D(raw_buy["avg_price"]) == gross / buy.amount
        assert orjson.loads(raw_buy["fills"])[0].keys() == {"fill_id", "ts", "amount", "price", "fee",
                                                            "fee_currency", "taker"}

        # Both final, and still open: the PnL loop closes an intent when it books its report, never before.
        assert set(await client.hkeys(KEY_OPEN_INTENTS)) == {buy.intent_id, sell.intent_id}
        events = [e for e in await read_events(client) if e["type"] == "order"]
        assert {e["intent_id"] for e in events} == {buy.intent_id, sell.intent_id}
        # The lake has the same rows.
        lake_rows = [row for path in channel_files(settings.parquet_dir, utc_day(now_ms()), LAKE_CHANNEL)
                     for row in read_jsonl(path)]
        assert [row["intent_id"] for row in lake_rows] == [buy.intent_id, sell.intent_id]
        assert lake_rows[0]["fills"] == raw_buy["fills"] and lake_rows[0]["fee"] == raw_buy["fee"]
        # Paper: nothing reached the exchange.
        signed = BitvavoRest(sim.rest_url, api_key=SecretStr(sim.api_key), api_secret=SecretStr(sim.api_secret))
        try:
            assert signed.open_orders() == [] and signed.trades("BTC-EUR") == []
        finally:
            signed.close()
    finally:
        sim.resume_feed()
        rest.close()
        await client.aclose()


async def test_kill_switch_stops_execution_until_cleared(sim: SimHandle, redis_db_url: str, tmp_path: Path) -> None:
    settings = _settings(sim, tmp_path)
    client = async_client(redis_db_url)
    port = free_port()
    try:
        async with _executor(settings, redis_db_url, _venue(settings), metrics_port=port):
            before = [_intent(amount_quote=D("20")) for _ in range(3)]
            await _send(client, *before)
            await _wait_reports(client, 3)

            await set_kill_switch(client, enabled=True, operator="test", reason="kill while flowing")
            blocked = [_intent(amount_quote=D("20")) for _ in range(3)]
            await _send(client, *blocked)

            async def blocked_seen() -> bool:
                events = await read_events(client)
                return sum(1 for e in events if e["type"] == "kill_switch" and e.get("intent_id")) == 3

            await _until(blocked_seen)
            await asyncio.sleep(0.2)  # a poll round or two: still nothing executed
            assert [r.intent_id for r in await _reports(client)] == [i.intent_id for i in before]
            events = [e for e in await read_events(client) if e["type"] == "kill_switch" and e.get("intent_id")]
            assert [e["intent_id"] for e in events] == [i.intent_id for i in blocked]
            assert events[0]["severity"] == "warning" and events[0]["detail"]["action"] == "refused"
            # Blocked intents are no longer open; executed ones stay open until the PnL loop books them.
            assert set(await client.hkeys(KEY_OPEN_INTENTS)) == {i.intent_id for i in before}

            await set_kill_switch(client, enabled=False, operator="test", reason="resume")
            after = [_intent(amount_quote=D("20")) for _ in range(2)]
            await _send(client, *after)
            reports = await _wait_reports(client, 5)
            assert [r.intent_id for r in reports] == [i.intent_id for i in before + after]
            assert all(r.status == "filled" for r in reports)

            await asyncio.sleep(0.15)  # one gauge refresh
            text = _metrics(port)
            assert "trader_executor_kill_switch_blocks_total 3.0" in text
            assert 'trader_executor_refusals_total{reason="kill_switch"} 3.0' in text
            assert 'trader_executor_orders_total{mode="paper",status="filled"} 5.0' in text
            assert 'trader_executor_intents_total{mode="paper"} 8.0' in text
            assert 'trader_executor_consumer_lag{stream="orders:shadow"} 0.0' in text
            assert 'trader_executor_fills_total{liquidity="taker",mode="paper"}' in text
            assert "trader_executor_submit_latency_seconds_count" in text
    finally:
        await client.aclose()


async def test_bad_and_refused_intents_do_not_stop_the_loop(sim: SimHandle, redis_db_url: str,
                                                           tmp_path: Path) -> None:
    settings = _settings(sim, tmp_path)
    client = async_client(redis_db_url)
    try:
        async with _executor(settings, redis_db_url, _venue(settings), max_intent_age_s=5.0) as task:
            malformed = {**_intent(amount_quote=D("20")).encode(), "amount_quote": "12,5"}
            await client.xadd(ORDERS_SHADOW, malformed)  # type: ignore[arg-type]
            unknown = _intent(market="FOO-EUR", amount_quote=D("20"))
            stale = _intent(amount_quote=D("20"), ts=now_ms() - 60_000)
            live = _intent(amount_quote=D("20"), dry_run=False)
            good = _intent(amount_quote=D("20"))
            await _send(client, unknown, stale, live, good, good)  # the last one a replay of the same intent
            [report] = await _wait_reports(client, 1)
            assert report.intent_id == good.intent_id and report.status == "filled"
            await _until(lambda: _pending_is(client, 0))
            assert len(await _reports(client)) == 1 and not task.done()

        dead = [decode_entry(f) for _id, f in await client.xrange(dead_letter_stream(ORDERS_SHADOW))]
        assert [d["cause"] for d in dead] == ["rejected", "rejected"]
        assert "amount_quote" in dead[0]["reason"] and "market FOO-EUR is not listed" in dead[1]["reason"]
        events = {e["intent_id"]: e for e in await read_events(client) if e.get("intent_id")}
        assert events[stale.intent_id]["type"] == "intent_expired"
        assert events[live.intent_id]["type"] == "mode_mismatch" and events[live.intent_id]["severity"] == "critical"
        assert events[unknown.intent_id]["type"] == "intent_refused_by_executor"
        # None of the refused ones stays open; the good one waits for the PnL loop's booking.
        assert await client.hkeys(KEY_OPEN_INTENTS) == [good.intent_id]
    finally:
        await client.aclose()


async def test_crash_between_submit_and_ack_executes_once_after_restart(sim: SimHandle, redis_db_url: str,
                                                                        tmp_path: Path) -> None:
    settings = _settings(sim, tmp_path)
    client = async_client(redis_db_url)
    try:
        first, doomed = _intent(amount_quote=D("20")), _intent(amount_quote=D("30"))
        await _send(client, first, doomed)
        dying = DiesAfterSubmitting(doomed.intent_id, markets=MARKETS, rest_url=settings.bitvavo_rest_url,
                                    ws_url=settings.bitvavo_ws_url, balances=RICH)
        with pytest.raises(ProcessDeath):
            async with _executor(settings, redis_db_url, dying) as task:
                await task
        assert [r.intent_id for r in await _reports(client)] == [first.intent_id]
        pending = await client.xpending(ORDERS_SHADOW, "executor")
        assert pending["pending"] == 1  # read, executed in the dead process's paper book, never acknowledged

        assert dying.stats.orders_placed == 2  # the doomed intent did execute, in the process that died

        async with _executor(settings, redis_db_url, _venue(settings), duration_s=1.0) as task:
            summary = await task
        reports = await _reports(client)
        assert [r.intent_id for r in reports] == [first.intent_id, doomed.intent_id]
        assert reports[1].status == "filled" and reports[1].filled_amount_quote > 0
        assert (await client.xpending(ORDERS_SHADOW, "executor"))["pending"] == 0
        assert (summary.reclaimed, summary.intents, summary.reports, summary.duplicates) == (1, 1, 1, 0)
    finally:
        await client.aclose()


class FailsAfterSubmittingOnce(PaperVenue):
    """Fault injection: the order is placed, then the kill switch goes on and the commit fails once."""

    def __init__(self, client: redis.asyncio.Redis, **options: Any) -> None:
        super().__init__(**options)
        self.client = client
        self.failed = False

    async def submit(self, intent: Intent) -> list[ExecutionReport]:
        reports = await super().submit(intent)
        if not self.failed:
            self.failed = True
            await self.client.set("trading:kill", "1")
            raise RuntimeError("the transaction could not commit (simulated)")
        return reports


async def test_an_order_already_out_is_recorded_on_retry_even_if_the_kill_switch_went_on(
        sim: SimHandle, redis_db_url: str, tmp_path: Path) -> None:
    settings = _settings(sim, tmp_path)
    client = async_client(redis_db_url)
    try:
        intent = _intent(amount_quote=D("20"))
        await _send(client, intent)
        venue = FailsAfterSubmittingOnce(client, markets=MARKETS, rest_url=settings.bitvavo_rest_url,
                                         ws_url=settings.bitvavo_ws_url, balances=RICH)
        async with _executor(settings, redis_db_url, venue):
            [report] = await _wait_reports(client, 1)
        assert report.intent_id == intent.intent_id and report.status == "filled"  # the fill is not lost
        assert venue.stats.orders_placed == 1
        assert not [e for e in await read_events(client) if e["type"] == "kill_switch"]
    finally:
        await client.aclose()


async def test_resting_paper_orders_are_closed_as_canceled_on_restart(sim: SimHandle, redis_db_url: str,
                                                                      tmp_path: Path) -> None:
    settings = _settings(sim, tmp_path)
    client = async_client(redis_db_url)
    rest = BitvavoRest(sim.rest_url)
    try:
        far_below = D(rest.book("BTC-EUR").bids[0][0]) - 500  # tick 1: still on the grid, never reached
        resting = _intent(order_type="limit", tif="GTC", amount=D("0.001"), price=far_below)
        async with _executor(settings, redis_db_url, _venue(settings)):
            await _send(client, resting)
            [accepted] = await _wait_reports(client, 1)
        assert accepted.status == "new" and not accepted.final
        assert await client.hexists(KEY_OPEN_INTENTS, resting.intent_id)
        assert await client.hexists(KEY_PAPER_OPEN, resting.intent_id)

        async with _executor(settings, redis_db_url, _venue(settings)):
            _, canceled = await _wait_reports(client, 2)
        assert canceled.intent_id == resting.intent_id and canceled.order_id == accepted.order_id
        assert canceled.status == "canceled" and canceled.reason == RESTART_REASON and canceled.fills == ()
        assert await client.hexists(KEY_OPEN_INTENTS, resting.intent_id)  # until the PnL loop books the cancel
        assert not await client.hexists(KEY_PAPER_OPEN, resting.intent_id)
    finally:
        rest.close()
        await client.aclose()


def _lake_rows(settings: Settings) -> list[dict[str, Any]]:
    return [row for path in channel_files(settings.parquet_dir, utc_day(now_ms()), LAKE_CHANNEL)
            for row in read_jsonl(path)]


async def _stream_ids(client: redis.asyncio.Redis) -> list[str]:
    return [entry_id for entry_id, _fields in await client.xrange(ORDERS_EXECUTED)]


async def test_a_lake_that_cannot_be_written_stops_the_loop_and_the_next_start_copies_what_was_committed(
        sim: SimHandle, redis_db_url: str, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("the lake root cannot be created here")
    settings = dataclasses.replace(_settings(sim, tmp_path), parquet_dir=blocker / "lake")
    client = async_client(redis_db_url)
    try:
        intent = _intent(amount_quote=D("20"))
        with pytest.raises(LakeWriteError, match="partition directory"):
            async with _executor(settings, redis_db_url, _venue(settings)) as task:
                await _send(client, intent)
                async with asyncio.timeout(10):
                    await task
        [report] = await _reports(client)  # committed before the copy: the stream (and the ledger) have it
        assert report.intent_id == intent.intent_id and report.status == "filled"
        assert (await client.xpending(ORDERS_SHADOW, "executor"))["pending"] == 0

        blocker.unlink()  # the disk is writable again
        async with _executor(settings, redis_db_url, _venue(settings)):
            await _until(lambda: _async(len(_lake_rows(settings)) == 1))
        [row] = _lake_rows(settings)
        assert row["intent_id"] == intent.intent_id and [row["stream_id"]] == await _stream_ids(client)
    finally:
        await client.aclose()


class DiesBeforeTheLakeCopy(LakeWriter):
    """Fault injection: the process dies after the doomed intent's report committed, before its lake copy."""

    doomed = ""

    def write_batch(self, rows: Sequence[Mapping[str, Any]], *, ts_ms: int | None = None) -> int:
        if any(row.get("intent_id") == self.doomed for row in rows):
            raise ProcessDeath("killed between the commit and the lake copy")
        return super().write_batch(rows, ts_ms=ts_ms)


class KeepsItsReports(DiesAfterSubmitting):
    """DiesAfterSubmitting that keeps what the dead execution reported, for comparison."""

    lost: list[ExecutionReport]

    async def submit(self, intent: Intent) -> list[ExecutionReport]:
        reports = await PaperVenue.submit(self, intent)
        if intent.intent_id == self.doomed:
            self.lost = reports
            raise ProcessDeath("killed between the venue and the commit")
        return reports


async def test_the_lake_and_the_stream_agree_after_crashes_around_the_commit(
        sim: SimHandle, redis_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(sim, tmp_path)
    client = async_client(redis_db_url)
    try:
        # 1. Committed, then the process dies before copying it to the lake.
        committed = _intent(amount_quote=D("20"))
        await _send(client, committed)
        with monkeypatch.context() as patch:
            DiesBeforeTheLakeCopy.doomed = committed.intent_id
            patch.setattr("trading.execution.executor.LakeWriter", DiesBeforeTheLakeCopy)
            with pytest.raises(ProcessDeath):
                async with _executor(settings, redis_db_url, _venue(settings)) as task:
                    await task
        assert [r.intent_id for r in await _reports(client)] == [committed.intent_id]
        assert _lake_rows(settings) == []

        # 2. Executed, then the process dies before the commit: nothing of it may reach the lake.
        doomed = _intent(amount_quote=D("30"))
        dying = KeepsItsReports(doomed.intent_id, markets=MARKETS, rest_url=settings.bitvavo_rest_url,
                                ws_url=settings.bitvavo_ws_url, balances=RICH)
        await _send(client, doomed)
        with pytest.raises(ProcessDeath):
            async with _executor(settings, redis_db_url, dying) as task:
                await task
        [lost] = dying.lost
        assert lost.fills and [row["intent_id"] for row in _lake_rows(settings)] == [committed.intent_id]

        # 3. A clean run executes the doomed intent again and copies everything committed, once.
        sell = _intent(side="sell", amount=D("0.0001"))
        await _holds(client, "BTC-EUR", D("0.0001"))
        async with _executor(settings, redis_db_url, _venue(settings)):
            await _send(client, sell)
            await _until(lambda: _async(len(_lake_rows(settings)) == 3))
        reports = await _reports(client)
        assert [r.intent_id for r in reports] == [committed.intent_id, doomed.intent_id, sell.intent_id]
        assert [row["stream_id"] for row in _lake_rows(settings)] == await _stream_ids(client)
        recorded_fill_ids = {f.fill_id for r in reports for f in r.fills}
        assert recorded_fill_ids.isdisjoint(f.fill_id for f in lost.fills)  # the dead execution's ids are not reused

        from_lake = rebuild_from_lake(settings.parquet_dir, [utc_day(now_ms())])
        from_stream = await rebuild_from_stream(client)
        assert from_lake.ledgers == from_stream.ledgers
        assert from_stream.ledgers.paper.fill_ids == recorded_fill_ids and from_stream.rejected == 0
    finally:
        await client.aclose()


async def test_an_abandoned_open_intent_is_released(sim: SimHandle, redis_db_url: str, tmp_path: Path) -> None:
    settings = _settings(sim, tmp_path)
    client = async_client(redis_db_url)
    try:
        old = now_ms() - 120_000  # its entry was dead-lettered long ago; nothing will ever close it
        await client.hset(KEY_OPEN_INTENTS, mapping={
            "abandoned": orjson.dumps({"market": "BTC-EUR", "side": "buy", "notional": "50", "ts": old}).decode(),
            "recent": orjson.dumps({"market": "BTC-EUR", "side": "buy", "notional": "50", "ts": now_ms()}).decode()})
        async with _executor(settings, redis_db_url, _venue(settings)):
            await _until(lambda: _async_not(client.hexists(KEY_OPEN_INTENTS, "abandoned")))
        assert await client.hexists(KEY_OPEN_INTENTS, "recent")  # still within its age: left alone
        released = [e for e in await read_events(client) if e["type"] == "open_intent_released"]
        assert [e["intent_id"] for e in released] == ["abandoned"]
    finally:
        await client.aclose()


async def _async_not(check: Awaitable[Any]) -> bool:
    return not await check


async def test_the_paper_account_holds_the_paper_ledgers_positions_after_a_restart(
        sim: SimHandle, redis_db_url: str, tmp_path: Path) -> None:
    """Coins bought on paper in an earlier run are in the paper account of the next one: a paper sell is
    judged against the paper book, not refused [216] because the account restarted from EUR only."""
    settings = _settings(sim, tmp_path)
    client = async_client(redis_db_url)
    try:
        await client.hset(pnl_key(True), mapping={"BTC-EUR:position": "0.002", "ETH-EUR:position": "0",
                                                  "updated_ts": str(now_ms())})
        sell = _intent(side="sell", amount=D("0.002"))
        async with _executor(settings, redis_db_url, _venue(settings, balances={"EUR": D(1000)})):
            await _send(client, sell)
            [sold] = await _wait_reports(client, 1)
        # Without the ledger's 0.002 BTC in the paper account this is `rejected` [216].
        assert (sold.intent_id, sold.status, sold.filled_amount) == (sell.intent_id, "filled", D("0.002"))
    finally:
        await client.aclose()
