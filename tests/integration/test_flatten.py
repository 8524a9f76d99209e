"""Flatten against the simulator, with the executor and the PnL loop running: every sale is an execution report.

Dry-run sells the paper ledger's position on the paper venue and never touches the exchange account;
live cancels the open orders and sells the live ledger's position (scope ledger) or everything
available (scope account) through the live venue, with its clientOrderId. The kill switch stays on
and still stops every trade intent; a flatten intent beyond its cap is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio
from pydantic import SecretStr

from flows.ops import FlattenIncomplete, flatten
from tests.integration.conftest import SimHandle
from trading.bus import (
    KEY_KILL,
    KEY_OPEN_INTENTS,
    ORDERS_EXECUTED,
    ORDERS_SHADOW,
    flatten_authorization_key,
    pnl_key,
)
from trading.clock import now_ms
from trading.config import Settings
from trading.decimals import parse_decimal
from trading.events import read_events
from trading.exchange.rest import BitvavoRest
from trading.execution.executor import run_executor
from trading.execution.live import LiveVenue
from trading.execution.paper import PaperVenue
from trading.flatten import flatten_intent
from trading.golive import record_decision
from trading.orders import ExecutionReport, Intent, Venue
from trading.pnl_orchestrator import run_pnl
from trading.processes import free_port
from trading.redis_conn import async_client

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]

D = Decimal
MARKETS = ("BTC-EUR", "ETH-EUR")
OPERATOR = 7


def _env(monkeypatch: pytest.MonkeyPatch, sim: SimHandle, redis_url: str, lake: Path, *, live: bool) -> Settings:
    # Credentials in both modes: dry-run must not use them even when it could.
    values = {"REDIS_URL": redis_url, "PARQUET_DIR": str(lake), "BITVAVO_REST_URL": sim.rest_url,
              "BITVAVO_WS_URL": sim.ws_url, "INGEST_MARKETS": ",".join(MARKETS), "BITVAVO_OPERATOR_ID": str(OPERATOR),
              "DRY_RUN": "false" if live else "true", "BITVAVO_API_KEY": sim.api_key,
              "BITVAVO_API_SECRET": sim.api_secret}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return Settings.from_env()


def _signed(sim: SimHandle) -> BitvavoRest:
    return BitvavoRest(sim.rest_url, api_key=SecretStr(sim.api_key), api_secret=SecretStr(sim.api_secret),
                       operator_id=OPERATOR)


def _available(rest: BitvavoRest) -> dict[str, Decimal]:
    return {row["symbol"]: parse_decimal(row["available"]) for row in rest.balance()}


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.05)


@asynccontextmanager
async def _loops(settings: Settings, redis_url: str, venue: Venue) -> AsyncIterator[None]:
    """The executor and the PnL loop, until the block ends; an error in either fails the test."""
    tasks = [asyncio.create_task(run_executor(settings, redis_url=redis_url, venue=venue, metrics_port=free_port(),
                                              poll_interval_s=0.05, gauge_interval_s=0.5)),
             asyncio.create_task(run_pnl(settings, redis_url=redis_url, metrics_port=free_port(), mark_every_s=0.2,
                                         gauge_every_s=1.0, block_ms=50))]
    client = async_client(redis_url)
    try:
        async def consuming() -> bool:
            for task in tasks:
                if task.done():
                    task.result()  # raises what stopped it
            groups = [g["name"] for g in await client.xinfo_groups(ORDERS_SHADOW)] \
                if await client.exists(ORDERS_SHADOW) else []
            return "executor" in groups

        await _until(consuming)
        yield
    finally:
        await client.aclose()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _trade(market: str, side: str, *, dry_run: bool, amount: Decimal, order_type: str = "market",
           tif: str = "IOC", price: Decimal | None = None) -> Intent:
    return Intent(intent_id=str(uuid.uuid4()), signal_id=str(uuid.uuid4()), market=market, side=side,  # type: ignore[arg-type]
                  order_type=order_type, time_in_force=tif, dry_run=dry_run, ts=now_ms(),  # type: ignore[arg-type]
                  amount=amount, price=price)


async def _send(client: redis.asyncio.Redis, intent: Intent) -> None:
    async with client.pipeline(transaction=True) as tx:
        tx.xadd(ORDERS_SHADOW, intent.encode())  # type: ignore[arg-type]
        tx.hset(KEY_OPEN_INTENTS, intent.intent_id, orjson.dumps(
            {"market": intent.market, "side": intent.side, "notional": "10", "amount": str(intent.amount),
             "ts": intent.ts}).decode())
        await tx.execute()


async def _reports(client: redis.asyncio.Redis, intent_id: str) -> list[ExecutionReport]:
    reports = [ExecutionReport.decode(fields) for _id, fields in await client.xrange(ORDERS_EXECUTED)]
    return [r for r in reports if r.intent_id == intent_id]


async def _final(client: redis.asyncio.Redis, intent_id: str) -> ExecutionReport:
    async def final() -> bool:
        return any(r.final for r in await _reports(client, intent_id))

    await _until(final)
    [report] = [r for r in await _reports(client, intent_id) if r.final]
    return report


async def _position(client: redis.asyncio.Redis, market: str, *, dry_run: bool) -> Decimal | None:
    raw = await client.hget(pnl_key(dry_run), f"{market}:position")
    return None if raw is None else D(raw)


async def _position_is(client: redis.asyncio.Redis, market: str, amount: Decimal, *, dry_run: bool) -> None:
    async def reached() -> bool:
        return await _position(client, market, dry_run=dry_run) == amount

    await _until(reached)


async def _event_for(client: redis.asyncio.Redis, intent_id: str) -> dict[str, Any]:
    async def seen() -> bool:
        return any(e.get("intent_id") == intent_id for e in await read_events(client))

    await _until(seen)
    return [e for e in await read_events(client) if e.get("intent_id") == intent_id][-1]


async def test_dry_run_flatten_sells_the_paper_position_on_the_paper_venue_and_never_the_account(
        sim: SimHandle, redis_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _env(monkeypatch, sim, redis_db_url, tmp_path, live=False)
    client = async_client(redis_db_url)
    signed = _signed(sim)
    try:
        account_before = _available(signed)
        async with _loops(settings, redis_db_url, PaperVenue.from_settings(settings, MARKETS)):
            buy = _trade("BTC-EUR", "buy", dry_run=True, amount=D("0.001"))
            await _send(client, buy)
            assert (await _final(client, buy.intent_id)).filled_amount == D("0.001")
            await _position_is(client, "BTC-EUR", D("0.001"), dry_run=True)

            summary = await flatten(operator="bob", reason="drill", close_positions=True)

            [sale] = summary["sales"]
            assert (sale["market"], sale["amount"], sale["status"]) == ("BTC-EUR", "0.001", "filled")
            report = await _final(client, sale["intent_id"])
            assert report.dry_run and report.side == "sell" and report.filled_amount == D("0.001")
            assert [f["fill_id"] for f in sale["fills"]] == [f.fill_id for f in report.fills] and report.fills
            assert {row["market"] for row in summary["skipped"]} == {"ETH-EUR"}  # nothing held there
            await _position_is(client, "BTC-EUR", D("0"), dry_run=True)  # the PnL loop booked the sale

            # The kill switch stays on: a trade intent is still refused, and so is a flatten beyond the position.
            assert await client.get(KEY_KILL) == "1"
            normal = _trade("BTC-EUR", "buy", dry_run=True, amount=D("0.001"))
            await _send(client, normal)
            assert (await _event_for(client, normal.intent_id))["type"] == "kill_switch"
            forged = flatten_intent("BTC-EUR", D("0.0001"), dry_run=True, scope="ledger", ts=now_ms())
            await _send(client, forged)  # written to orders:shadow without the flatten flow's authorization
            refused = await _event_for(client, forged.intent_id)
            assert refused["type"] == "flatten_refused" and "no flatten authorization" in refused["detail"]["reason"]
            beyond = flatten_intent("BTC-EUR", D("0.001"), dry_run=True, scope="ledger", ts=now_ms())
            await client.set(flatten_authorization_key(beyond.intent_id), "1", ex=60)
            await _send(client, beyond)
            refused = await _event_for(client, beyond.intent_id)
            assert refused["type"] == "flatten_refused" and "more than" in refused["detail"]["reason"]
            assert await _reports(client, normal.intent_id) == await _reports(client, beyond.intent_id) == []
            assert await _reports(client, forged.intent_id) == []

        [event] = [e for e in await read_events(client) if e["type"] == "flatten"]
        assert event["detail"]["mode"] == "paper" and event["detail"]["sales"][0]["fills"] == sale["fills"]
        assert _available(signed) == account_before and signed.open_orders() == []  # nothing at the exchange
    finally:
        signed.close()
        await client.aclose()


async def test_flatten_skips_a_position_below_the_minimum_and_says_when_the_executor_does_not_answer(
        sim: SimHandle, redis_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, sim, redis_db_url, tmp_path, live=False)
    client = async_client(redis_db_url)
    try:
        await client.hset(pnl_key(True), mapping={"BTC-EUR:position": "0.002", "ETH-EUR:position": "0.00000001",
                                                  "updated_ts": str(now_ms())})
        with pytest.raises(FlattenIncomplete, match="1 without a report"):
            await flatten(operator="bob", reason="no executor", close_positions=True, wait_s=0.5)
        [event] = [e for e in await read_events(client) if e["type"] == "flatten"]
        [sale] = event["detail"]["sales"]
        assert sale["market"] == "BTC-EUR" and sale["status"] == "no report" and "executor" in sale["reason"]
        assert event["detail"]["unreported"] == [sale["intent_id"]]
        [skipped] = event["detail"]["skipped"]
        assert skipped["market"] == "ETH-EUR" and "below the minimum" in skipped["reason"]
        assert await client.get(KEY_KILL) == "1"
    finally:
        await client.aclose()


async def test_flatten_validates_its_parameters_before_acting(
        sim: SimHandle, redis_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, sim, redis_db_url, tmp_path, live=False)
    with pytest.raises(ValueError, match="operator and reason are required"):
        await flatten(operator=" ", reason="")
    with pytest.raises(ValueError, match="scope=account is for live flatten only"):
        await flatten(operator="bob", reason="test", close_positions=True, scope="account")
    assert await async_client(redis_db_url).get(KEY_KILL) is None  # nothing done


def _live_venue(client: redis.asyncio.Redis, settings: Settings) -> LiveVenue:
    return LiveVenue(client, settings, poll_interval_s=0.05, reconcile_interval_s=0.2)


async def test_live_flatten_cancels_the_open_orders_and_sells_the_live_ledger_position_through_the_executor(
        sim_factory: Callable[..., SimHandle], redis_db_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    sim = sim_factory(markets=",".join(MARKETS))
    settings = _env(monkeypatch, sim, redis_db_url, tmp_path, live=True)
    client = async_client(redis_db_url)
    signed = _signed(sim)
    try:
        await record_decision(client, decision="GO", operator="test", reason="test", decided_ms=now_ms(),
                              valid_for_ms=3_600_000)
        account_before = _available(signed)
        async with _loops(settings, redis_db_url, _live_venue(client, settings)):
            buy = _trade("BTC-EUR", "buy", dry_run=False, amount=D("0.001"))
            await _send(client, buy)
            assert (await _final(client, buy.intent_id)).filled_amount == D("0.001")
            await _position_is(client, "BTC-EUR", D("0.001"), dry_run=False)
            far_below = signed.book("BTC-EUR").bids[0][0] - 500
            resting = _trade("BTC-EUR", "buy", dry_run=False, amount=D("0.001"), order_type="limit", tif="GTC",
                             price=far_below)
            await _send(client, resting)
            await _until(lambda: _has_reports(client, resting.intent_id))
            # The gate closes (a NO-GO): flatten still sells, within the live ledger's position.
            await record_decision(client, decision="NO-GO", operator="preflight", reason="drill",
                                  decided_ms=now_ms(), valid_for_ms=1)

            summary = await flatten(operator="alice", reason="drill", close_positions=True)

            assert signed.open_orders() == []
            canceled = await _final(client, resting.intent_id)  # the venue saw the cancel
            assert canceled.status == "canceled" and canceled.fills == ()
            assert [row["order_id"] for row in summary["cancelled"]] == [canceled.order_id]
            [sale] = summary["sales"]
            assert (sale["market"], sale["amount"], sale["status"]) == ("BTC-EUR", "0.001", "filled")
            order = signed.get_order("BTC-EUR", client_order_id=sale["intent_id"])  # the clientOrderId is the intent's
            report = await _final(client, sale["intent_id"])
            assert (order.order_id, order.side, report.order_id, report.dry_run) == (sale["order_id"], "sell",
                                                                                      sale["order_id"], False)
            assert {f.fill_id for f in report.fills} == {f.fill_id for f in order.fills}
            await _position_is(client, "BTC-EUR", D("0"), dry_run=False)
            assert {row["market"] for row in summary["skipped"]} == {"ETH-EUR"}  # held, but not by the bot
        account_after = _available(signed)
        assert account_after["BTC"] == account_before["BTC"] and account_after["ETH"] == account_before["ETH"]
        assert await client.get(KEY_KILL) == "1"
    finally:
        signed.close()
        await client.aclose()


async def _has_reports(client: redis.asyncio.Redis, intent_id: str) -> bool:
    return bool(await _reports(client, intent_id))


async def test_live_flatten_with_scope_account_sells_everything_available(
        sim_factory: Callable[..., SimHandle], redis_db_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    sim = sim_factory(markets=",".join(MARKETS))
    settings = _env(monkeypatch, sim, redis_db_url, tmp_path, live=True)
    client = async_client(redis_db_url)
    signed = _signed(sim)
    try:
        async with _loops(settings, redis_db_url, _live_venue(client, settings)):
            summary = await flatten(operator="alice", reason="dedicated account", close_positions=True,
                                    scope="account")
            sales = {sale["market"]: sale for sale in summary["sales"]}
            assert set(sales) == {"BTC-EUR", "ETH-EUR"} and {s["status"] for s in sales.values()} == {"filled"}
            for sale in sales.values():
                report = await _final(client, sale["intent_id"])
                assert report.filled_amount == D(sale["amount"]) and not report.dry_run
        balances = _available(signed)
        assert balances["BTC"] < D("0.0001") and balances["ETH"] < D("0.001")  # only dust is left
        assert D(sales["BTC-EUR"]["amount"]) > D("0.4")
        # The bot's ledger held none of it: the sales are ledger anomalies, never a short position.
        async def booked_as_anomalies() -> bool:
            fields = [f"{market}:{name}" for market in sales for name in ("position", "unbooked")]
            values = await client.hmget(pnl_key(False), fields)
            expected = [D(v) for sale in sales.values() for v in ("0", sale["amount"])]
            return None not in values and [D(v) for v in values] == expected

        await _until(booked_as_anomalies)
    finally:
        signed.close()
        await client.aclose()
