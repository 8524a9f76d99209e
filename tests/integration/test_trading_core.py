"""The trading core loop on a real Redis: signals in, intents and events out, guards, restarts, lease."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio

from tests.integration.conftest import SimHandle
from trading.bus import KEY_KILL, KEY_OPEN_INTENTS, ORDERS_SHADOW, decode_entry, encode_entry, pnl_key
from trading.clock import now_ms
from trading.config import Settings
from trading.events import read_events
from trading.exchange.market_rules import market_rules_from_wire
from trading.golive import record_decision
from trading.lake import channel_files, read_jsonl, utc_day
from trading.lease import LeaseHeldError
from trading.matching import MarketRules
from trading.orders import ExecutionReport, FillRecord, Intent, intent_id_for
from trading.pnl import Ledgers
from trading.processes import free_port
from trading.risk import GUARD_NAMES, Limits
from trading.trading_core import (
    KEY_LAST_INTENT,
    LOOP_NAME,
    LakeFailure,
    TradingCoreSummary,
    load_market_rules,
    run_trading_core,
)

pytestmark = pytest.mark.integration

SIGNALS = "signals:baseline"
D = Decimal


def _rules(market: str, tick: str, decimals: int) -> MarketRules:
    return market_rules_from_wire({"market": market, "base": market.split("-")[0], "quote": "EUR",
                                   "tickSize": tick, "quantityDecimals": decimals, "notionalDecimals": 2,
                                   "minOrderInBaseAsset": "0.00001", "minOrderInQuoteAsset": "5.00",
                                   "status": "trading"})


RULES = {"BTC-EUR": _rules("BTC-EUR", "1", 8), "ETH-EUR": _rules("ETH-EUR", "0.01", 8),
         "XRP-EUR": _rules("XRP-EUR", "0.00001", 6)}
PRICES = {"BTC-EUR": "74096.5", "ETH-EUR": "2361.905", "XRP-EUR": "1.351335"}




def _signal(signal_id: str, market: str = "BTC-EUR", side: str = "buy", **changes: Any) -> dict[str, str]:
    fields: dict[str, Any] = {"ts": now_ms(), "signal_id": signal_id, "market": market, "side": side,
                              "strength": "0.8", "reason": "tight spread", "ref_price": PRICES.get(market, "1"),
                              "spread_bps": "1.5", "volatility": "4.2", "strategy": "baseline"}
    fields.update(changes)
    return encode_entry({k: v for k, v in fields.items() if v is not None})


async def _publish(client: redis.asyncio.Redis, *signals: dict[str, str]) -> None:
    for fields in signals:
        await client.xadd(SIGNALS, fields)  # type: ignore[arg-type]  # redis-py wants its value union


def _core(settings: Settings, url: str, **kwargs: Any) -> Awaitable[TradingCoreSummary]:
    kwargs.setdefault("duration_s", 1.0)
    kwargs.setdefault("metrics_port", free_port())
    return run_trading_core(settings, redis_url=url, market_rules=RULES, start_id="0", gauge_interval_s=0.1,
                            **kwargs)


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.02)


async def _hold(client: redis.asyncio.Redis, positions: dict[str, str], *, dry_run: bool = True) -> None:
    """A fresh ledger hash of the mode holding `positions` (what the PnL loop writes)."""
    fields = {"updated_ts": str(now_ms()), **{f"{market}:position": amount for market, amount in positions.items()}}
    await client.hset(pnl_key(dry_run), mapping=fields)  # type: ignore[arg-type]


async def _stop(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _intents(client: redis.asyncio.Redis) -> list[Intent]:
    return [Intent.decode(fields) for _id, fields in await client.xrange(ORDERS_SHADOW)]


def _lake(root: Path, channel: str) -> list[dict[str, Any]]:
    return [row for path in channel_files(root, utc_day(now_ms()), channel) for row in read_jsonl(path)]


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
        return text


async def test_signals_become_intents_with_the_contract_fields(client: redis.asyncio.Redis, redis_db_url: str,
                                                              tmp_path: Path) -> None:
    await _hold(client, {"XRP-EUR": "100"})
    await _publish(client, _signal("sig-btc", "BTC-EUR", "buy"), _signal("sig-xrp", "XRP-EUR", "sell"))
    summary = await _core(Settings(parquet_dir=tmp_path), redis_db_url)

    assert (summary.signals, summary.intents, summary.rejects, summary.dead_lettered) == (2, 2, {}, 0)
    raw = [fields for _id, fields in await client.xrange(ORDERS_SHADOW)]
    assert set(raw[0]) == {"v", "ts", "intent_id", "signal_id", "market", "side", "order_type", "amount", "price",
                           "time_in_force", "dry_run", "notional", "reduce_only"}
    btc, xrp = await _intents(client)
    # Buy bound 74096.5 x (1 + (0.75 + 10) bps) = 74176.15.. floored onto the 1 EUR tick; sized at that
    # worst price: 50 / 74176 = 0.000674071.. rounded down to 8 decimals, valued at 74176 (49.99981632 EUR).
    assert (btc.intent_id, btc.signal_id, btc.market, btc.side) == (intent_id_for("sig-btc"), "sig-btc", "BTC-EUR",
                                                                    "buy")
    assert (btc.order_type, btc.time_in_force, btc.dry_run, btc.reduce_only) == ("limit", "IOC", True, False)
    assert (btc.amount, btc.price, btc.notional) == (D("0.00067407"), D(74176), D("0.00067407") * D(74176))
    # 50 / 1.351335 = 37.0004.. down to 6 decimals; sell bound 1.351335 x (1 - 10.75 bps) = 1.349882.. ceiled.
    assert (xrp.side, xrp.amount, xrp.price) == ("sell", D("37.000447"), D("1.34989"))
    assert btc.amount_quote is None and xrp.notional == D("37.000447") * D("1.351335")

    open_intents = {k: orjson.loads(v) for k, v in (await client.hgetall(KEY_OPEN_INTENTS)).items()}
    assert open_intents[btc.intent_id] == {"market": "BTC-EUR", "side": "buy", "notional": "49.99981632",
                                           "amount": "0.00067407", "ts": btc.ts}
    assert set(open_intents) == {btc.intent_id, xrp.intent_id}
    assert set(await client.hkeys(KEY_LAST_INTENT)) == {"BTC-EUR", "XRP-EUR"}

    events = await read_events(client)
    assert [(e["type"], e["severity"], e["intent_id"]) for e in events] == [
        ("intent", "info", btc.intent_id), ("intent", "info", xrp.intent_id)]
    checks = events[0]["detail"]["checks"]
    assert [c["guard"] for c in checks] == list(GUARD_NAMES) and all(c["passed"] for c in checks)
    assert (await client.xpending(SIGNALS, LOOP_NAME))["pending"] == 0

    lake_intents = _lake(tmp_path, "orders/shadow")
    assert [row["intent_id"] for row in lake_intents] == [btc.intent_id, xrp.intent_id]
    assert lake_intents[0]["amount"] == "0.00067407" and lake_intents[0]["order_type"] == "limit"
    assert [row["type"] for row in _lake(tmp_path, "events/trading_core")] == ["intent", "intent"]


async def test_kill_switch_blocks_with_an_event_and_clearing_it_resumes(client: redis.asyncio.Redis,
                                                                        redis_db_url: str, tmp_path: Path) -> None:
    port = free_port()
    await client.set(KEY_KILL, "1")
    task = asyncio.create_task(_core(Settings(parquet_dir=tmp_path), redis_db_url, duration_s=20, metrics_port=port))
    try:
        await _publish(client, _signal("blocked", "BTC-EUR"))

        async def blocked() -> bool:
            return any(e["type"] == "kill_switch" for e in await read_events(client))

        await _until(blocked)
        event = (await read_events(client))[-1]
        assert (event["severity"], event["market"], event["detail"]["guard"]) == ("warning", "BTC-EUR", "kill_switch")
        assert "trading:kill=1" in event["detail"]["reason"]
        assert await client.xlen(ORDERS_SHADOW) == 0 and await client.hlen(KEY_OPEN_INTENTS) == 0

        text = await asyncio.to_thread(_metrics, port)
        assert "trading_core_kill_switch 1.0" in text
        assert 'trading_core_rejects_total{guard="kill_switch"} 1.0' in text
        assert f'trading_core_consumed_total{{stream="{SIGNALS}"}} 1.0' in text

        await client.delete(KEY_KILL)
        await _publish(client, _signal("after-clear", "BTC-EUR"))

        async def flowing() -> bool:
            return bool(await client.xlen(ORDERS_SHADOW) == 1)

        await _until(flowing)
        assert [i.signal_id for i in await _intents(client)] == ["after-clear"]
        assert (await read_events(client))[-1]["type"] == "intent"

        async def gauges_refreshed() -> bool:
            text = await asyncio.to_thread(_metrics, port)
            return "trading_core_kill_switch 0.0" in text and "trading_core_open_intents 1.0" in text

        await _until(gauges_refreshed)
        text = await asyncio.to_thread(_metrics, port)
        assert 'trading_core_intents_total{market="BTC-EUR",side="buy"} 1.0' in text
        assert "trading_core_decision_seconds_count 2.0" in text
        assert f'trading_core_pending{{stream="{SIGNALS}"}} 0.0' in text
    finally:
        await _stop(task)


async def test_live_intents_are_refused_while_the_gate_is_closed(client: redis.asyncio.Redis, redis_db_url: str,
                                                                tmp_path: Path) -> None:
    live = Settings(parquet_dir=tmp_path, dry_run=False, bitvavo_operator_id=1)
    task = asyncio.create_task(_core(live, redis_db_url, duration_s=20))
    try:
        await _publish(client, _signal("live-closed", "BTC-EUR"))

        async def refused() -> bool:
            return any(e["type"] == "reject" for e in await read_events(client))

        await _until(refused)
        event = (await read_events(client))[-1]
        assert event["detail"]["guard"] == "live_gate"
        assert "no go-live decision recorded" in event["detail"]["reason"]
        assert await client.xlen(ORDERS_SHADOW) == 0

        await record_decision(client, decision="GO", operator="test", reason="test", decided_ms=now_ms(),
                              valid_for_ms=3_600_000)
        await _publish(client, _signal("live-open", "BTC-EUR"))

        async def sent() -> bool:
            return bool(await client.xlen(ORDERS_SHADOW) == 1)

        await _until(sent)
        (intent,) = await _intents(client)
        assert (intent.signal_id, intent.dry_run) == ("live-open", False)
        assert next(c for c in (await read_events(client))[-1]["detail"]["checks"]
                    if c["guard"] == "live_gate")["reason"].startswith("GO by test")
    finally:
        await _stop(task)


async def test_bad_signals_go_to_the_dead_letter_stream_and_the_loop_goes_on(client: redis.asyncio.Redis,
                                                                            redis_db_url: str,
                                                                            tmp_path: Path) -> None:
    await _publish(client, _signal("no-price", ref_price=None), _signal("nan", ref_price="abc"),
                   _signal("negative", ref_price="-5"), _signal("doge", market="DOGE-EUR"),
                   _signal("hold", side="hold"), _signal("good", "ETH-EUR"))
    summary = await _core(Settings(parquet_dir=tmp_path), redis_db_url)

    assert (summary.dead_lettered, summary.intents) == (5, 1)
    dead = [decode_entry(fields) for _id, fields in await client.xrange(SIGNALS + ":dead")]
    reasons = [d["reason"] for d in dead]
    assert reasons == ["bad signal: missing ref_price", "bad signal: ref_price is not a decimal: 'abc'",
                       "bad signal: ref_price must be positive, got -5",
                       "bad signal: unknown market 'DOGE-EUR' (not listed by GET /markets)",
                       "bad signal: side must be buy or sell, got 'hold'"]
    assert all(d["cause"] == "rejected" and d["group"] == LOOP_NAME for d in dead)
    assert orjson.loads(dead[1]["fields"])["signal_id"] == "nan"
    assert [i.signal_id for i in await _intents(client)] == ["good"]
    assert (await client.xpending(SIGNALS, LOOP_NAME))["pending"] == 0


async def test_a_crash_between_read_and_ack_gives_exactly_one_intent_after_restart(
        client: redis.asyncio.Redis, redis_db_url: str, tmp_path: Path) -> None:
    settings = Settings(parquet_dir=tmp_path)
    await _publish(client, _signal("crashed", "BTC-EUR"))
    # An earlier instance read the signal and died before its transaction (nothing written, no ack).
    await client.xgroup_create(SIGNALS, LOOP_NAME, id="0")
    assert len((await client.xreadgroup(LOOP_NAME, "dead-instance", {SIGNALS: ">"}))[0][1]) == 1

    first = await _core(settings, redis_db_url)
    assert (first.reclaimed, first.intents) == (1, 1)

    # The same signal again (a replay) and a new one for the same market: one intent per signal_id,
    # and the cooldown kept in Redis outlives the restart.
    await _publish(client, _signal("crashed", "BTC-EUR"), _signal("too-soon", "BTC-EUR"))
    second = await _core(settings, redis_db_url)
    assert (second.duplicates, second.intents, second.rejects) == (1, 0, {"cooldown": 1})
    assert [i.intent_id for i in await _intents(client)] == [intent_id_for("crashed")]
    assert (await client.xpending(SIGNALS, LOOP_NAME))["pending"] == 0


async def test_a_second_instance_is_refused_by_the_lease(client: redis.asyncio.Redis, redis_db_url: str,
                                                        tmp_path: Path) -> None:
    task = asyncio.create_task(_core(Settings(parquet_dir=tmp_path), redis_db_url, duration_s=20))
    try:
        async def leased() -> bool:
            return bool(await client.exists(f"lease:{LOOP_NAME}"))

        await _until(leased)
        with pytest.raises(LeaseHeldError, match=LOOP_NAME):
            await _core(Settings(parquet_dir=tmp_path / "second"), redis_db_url)
        assert not task.done()
    finally:
        await _stop(task)


async def test_limit_overrides_apply_and_open_intents_count_as_exposure(client: redis.asyncio.Redis,
                                                                       redis_db_url: str, tmp_path: Path) -> None:
    settings = Settings(parquet_dir=tmp_path)
    limits = Limits.from_settings(settings, {"max_exposure_total": "120", "market_cooldown_ms": 0})
    await _publish(client, _signal("one", "BTC-EUR"), _signal("two", "ETH-EUR"), _signal("three", "XRP-EUR"))
    summary = await _core(settings, redis_db_url, limits=limits)
    # Nothing has filled (no PnL exposure), but two open intents of ~50 EUR leave no room for a third.
    assert (summary.intents, summary.rejects) == (2, {"max_exposure_total": 1})
    reject = (await read_events(client))[-1]["detail"]
    assert (reject["guard"], reject["limit"]) == ("max_exposure_total", "120")
    assert D(reject["measured"]) > 120


async def test_a_lake_failure_stops_the_loop_loudly(client: redis.asyncio.Redis, redis_db_url: str,
                                                   tmp_path: Path) -> None:
    not_a_dir = tmp_path / "lake"
    not_a_dir.write_text("a file where the lake should be")
    await _publish(client, _signal("s", "BTC-EUR"))
    with pytest.raises(LakeFailure, match="lake write failed"):
        await _core(Settings(parquet_dir=not_a_dir), redis_db_url, duration_s=10)
    assert await client.xlen(ORDERS_SHADOW) == 1  # the decision itself is in Redis


async def test_market_rules_come_from_get_markets(sim: SimHandle) -> None:
    rules, source = await load_market_rules(sim.rest_url)
    assert source.startswith("GET /markets: ")
    assert (rules["BTC-EUR"].tick_size, rules["BTC-EUR"].quantity_decimals) == (D("1.00"), 8)
    assert rules["XRP-EUR"].quantity_decimals == 6
    unreachable, why = await load_market_rules("http://127.0.0.1:9/v2", timeout_s=1)
    assert unreachable == {} and "GET /markets failed" in why


# -- spot inventory: a sell only of what the mode's ledger holds ------------------------------------

NO_COOLDOWN = Limits(max_notional_per_order=D(250), max_exposure_per_market=D(1000), max_exposure_total=D(5000),
                     max_open_intents=20, max_daily_loss=D(250), stale_book_ms=5_000, market_cooldown_ms=0)


async def _decisions(client: redis.asyncio.Redis) -> list[tuple[str, str | None]]:
    """(event type, failing guard) of every decision, oldest first."""
    return [(e["type"], e["detail"].get("guard")) for e in await read_events(client)]


async def test_a_sell_with_nothing_held_is_refused_as_no_inventory(client: redis.asyncio.Redis, redis_db_url: str,
                                                                   tmp_path: Path) -> None:
    await _hold(client, {"ETH-EUR": "3"})  # inventory elsewhere is no inventory for BTC
    await _publish(client, _signal("sell-nothing", "BTC-EUR", "sell"))
    port = free_port()
    summary = await _core(Settings(parquet_dir=tmp_path), redis_db_url, metrics_port=port, limits=NO_COOLDOWN)
    assert (summary.intents, summary.rejects) == (0, {"no_inventory": 1})
    (event,) = await read_events(client)
    assert (event["type"], event["severity"], event["detail"]["guard"]) == ("reject", "warning", "no_inventory")
    assert "nothing to sell: position 0 - open sells 0 = 0 BTC" in event["detail"]["reason"]
    assert await client.xlen(ORDERS_SHADOW) == 0 and await client.hlen(KEY_OPEN_INTENTS) == 0


async def test_a_sell_larger_than_the_position_is_capped_and_racing_sells_share_the_inventory(
        client: redis.asyncio.Redis, redis_db_url: str, tmp_path: Path) -> None:
    # 50 EUR at 74096.5 would be 0.00067479 BTC; the bot holds 0.001.
    await _hold(client, {"BTC-EUR": "0.001"})
    await _publish(client, *(_signal(f"sell-{n}", "BTC-EUR", "sell") for n in range(3)))
    summary = await _core(Settings(parquet_dir=tmp_path), redis_db_url, limits=NO_COOLDOWN)
    first, second = await _intents(client)
    # The first takes its full size; the second only what the first left (its open intent counts);
    # the third finds nothing left.
    assert (first.amount, second.amount) == (D("0.00067479"), D("0.001") - D("0.00067479"))
    assert first.amount + second.amount == D("0.001")
    assert summary.rejects == {"no_inventory": 1}
    open_sells = [orjson.loads(v) for v in (await client.hgetall(KEY_OPEN_INTENTS)).values()]
    assert sorted(D(o["amount"]) for o in open_sells) == sorted([first.amount, second.amount])


async def test_a_sell_after_a_partial_buy_fill_sells_only_what_filled(client: redis.asyncio.Redis,
                                                                       redis_db_url: str, tmp_path: Path) -> None:
    partial = ExecutionReport(intent_id="buy-1", order_id="o1", market="BTC-EUR", side="buy", status="canceled",
                              filled_amount=D("0.0002"), filled_amount_quote=D("14.8193"), fee=D(0),
                              fee_currency="EUR", dry_run=True, ts=now_ms(),
                              fills=(FillRecord("p1", now_ms(), D("0.0002"), D("74096.5"), D(0), "EUR", True),))
    ledgers = Ledgers()
    ledgers.apply(partial)
    await client.hset(pnl_key(True), mapping=ledgers.paper.snapshot(now_ms()))  # type: ignore[arg-type]
    await _publish(client, _signal("sell-after-partial", "BTC-EUR", "sell"))
    await _core(Settings(parquet_dir=tmp_path), redis_db_url, limits=NO_COOLDOWN)
    (intent,) = await _intents(client)
    assert (intent.side, intent.amount) == ("sell", D("0.0002"))


async def test_a_live_sell_reads_the_live_ledger_not_the_paper_one(client: redis.asyncio.Redis, redis_db_url: str,
                                                                   tmp_path: Path) -> None:
    await _hold(client, {"BTC-EUR": "1"}, dry_run=True)  # paper coins: no inventory for a live sell
    await _hold(client, {}, dry_run=False)
    await record_decision(client, decision="GO", operator="test", reason="test", decided_ms=now_ms(),
                          valid_for_ms=3_600_000)
    await _publish(client, _signal("live-sell", "BTC-EUR", "sell"))
    live = Settings(parquet_dir=tmp_path, dry_run=False, bitvavo_operator_id=1)
    summary = await _core(live, redis_db_url, limits=NO_COOLDOWN)
    assert summary.rejects == {"no_inventory": 1}
    await _hold(client, {"BTC-EUR": "0.0003"}, dry_run=False)
    await _publish(client, _signal("live-sell-2", "BTC-EUR", "sell"))
    await _core(live, redis_db_url, limits=NO_COOLDOWN)
    (intent,) = await _intents(client)
    assert (intent.dry_run, intent.amount) == (False, D("0.0003"))
