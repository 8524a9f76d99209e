"""The executor as the last line of defence: intents written straight into `orders:shadow`, past the
trading core, on the simulator, in live mode and in paper mode.

Each intent that breaks a market rule or one of the executor's own hard limits is dead-lettered with
its reason and a critical `intent_refused_by_executor` event, its open intent is released, and no
order is sent (live: the venue's send counter and the simulator's order list; paper: the paper
engine never saw it). A normal intent still goes through.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from decimal import ROUND_DOWN, Decimal
from pathlib import Path

import orjson
import pytest
import redis.asyncio
from pydantic import SecretStr

from tests.integration.conftest import SimHandle
from trading.bus import KEY_OPEN_INTENTS, ORDERS_EXECUTED, ORDERS_SHADOW, dead_letter_stream, decode_entry
from trading.clock import now_ms
from trading.config import Settings
from trading.events import read_events
from trading.exchange.governor import RateGovernor
from trading.exchange.market_rules import rules_from_markets
from trading.exchange.rest import BitvavoRest
from trading.execution.executor import run_executor
from trading.execution.live import LiveVenue
from trading.execution.paper import PaperVenue
from trading.matching import MarketRules
from trading.orders import ExecutionReport, Intent
from trading.processes import free_port

pytestmark = pytest.mark.integration

D = Decimal
MARKET = "BTC-EUR"
OPERATOR = 4242


@pytest.fixture
def rest(sim: SimHandle) -> Iterator[BitvavoRest]:
    """The simulator's account, left without open orders or faults."""
    view = BitvavoRest(sim.rest_url, api_key=SecretStr(sim.api_key), api_secret=SecretStr(sim.api_secret),
                       operator_id=OPERATOR, governor=RateGovernor())
    sim.control(clear=True, reset_rate_limits=True)
    try:
        yield view
    finally:
        view.cancel_orders()
        view.close()


@pytest.fixture
def client(live_client: redis.asyncio.Redis) -> redis.asyncio.Redis:
    """The test's Redis, with the go-live gate open (the venue re-checks it right before sending)."""
    return live_client


def _settings(sim: SimHandle, tmp_path: Path, *, dry_run: bool) -> Settings:
    return Settings(parquet_dir=tmp_path / "lake", ingest_markets=(MARKET,), dry_run=dry_run,
                    bitvavo_rest_url=sim.rest_url, bitvavo_ws_url=sim.ws_url,
                    bitvavo_api_key=SecretStr(sim.api_key), bitvavo_api_secret=SecretStr(sim.api_secret),
                    bitvavo_operator_id=OPERATOR)  # the limits are the defaults: 250 EUR per order


def _intent(dry_run: bool, *, market: str = MARKET, side: str = "buy", order_type: str = "limit",
            amount: Decimal | None = None, amount_quote: Decimal | None = None,
            price: Decimal | None = None) -> Intent:
    return Intent(intent_id=str(uuid.uuid4()), signal_id=str(uuid.uuid4()), market=market, side=side,  # type: ignore[arg-type]
                  order_type=order_type, time_in_force="IOC", dry_run=dry_run, ts=now_ms(),  # type: ignore[arg-type]
                  amount=amount, amount_quote=amount_quote, price=price)


def _poisoned(dry_run: bool, rules: MarketRules, bid: Decimal, ask: Decimal) -> dict[str, Intent]:
    """rule broken -> an intent breaking it (the amounts are valid unless the rule is about them)."""
    small = D("0.001")
    precision = D(10) ** -rules.quantity_decimals
    return {
        "listed": _intent(dry_run, market="FOO-EUR", order_type="market", amount_quote=D("10")),
        "amount": _intent(dry_run, amount=D("1e40"), price=ask),
        "price": _intent(dry_run, amount=small, price=D("1e400")),
        "off the tick grid": _intent(dry_run, amount=small, price=bid + rules.tick_size / 2),
        "too many decimals": _intent(dry_run, amount=small + D(10) ** -(rules.quantity_decimals + 1), price=ask),
        "below the minimum": _intent(dry_run, amount=(rules.min_order_base / 2).quantize(precision, ROUND_DOWN),
                                     price=ask),
        "max_notional": _intent(dry_run, amount=(D("260") / ask).quantize(precision), price=ask),
    }


EXPECTED_RULE = {"listed": "listed", "amount": "amount", "price": "price", "off the tick grid": "price",
                 "too many decimals": "amount", "below the minimum": "amount", "max_notional": "max_notional"}
EXPECTED_CODE = {"listed": "[205]", "amount": "[210]", "price": "[211]", "off the tick grid": "[422]",
                 "too many decimals": "[429]", "below the minimum": "[212]", "max_notional": "above 250 EUR"}


async def _write(client: redis.asyncio.Redis, intents: list[Intent]) -> None:
    """Straight into orders:shadow, registered as open the way the core registers its intents."""
    for intent in intents:
        async with client.pipeline(transaction=True) as tx:
            tx.xadd(ORDERS_SHADOW, intent.encode())  # type: ignore[arg-type]
            tx.hset(KEY_OPEN_INTENTS, intent.intent_id,
                    orjson.dumps({"market": intent.market, "side": intent.side, "notional": "10", "ts": intent.ts}))
            await tx.execute()


async def _run_until_handled(settings: Settings, url: str, venue: LiveVenue | PaperVenue,
                             client: redis.asyncio.Redis) -> None:
    """Run the executor until every entry of orders:shadow is delivered and settled."""
    [(last_id, _)] = await client.xrevrange(ORDERS_SHADOW, count=1)
    task = asyncio.create_task(run_executor(settings, redis_url=url, venue=venue, metrics_port=free_port(),
                                            poll_interval_s=0.05, max_intent_age_s=60))
    try:
        async with asyncio.timeout(20):
            while True:
                groups = await client.xinfo_groups(ORDERS_SHADOW)  # Redis 6.2: no entries-read
                if groups and groups[0]["pending"] == 0 and groups[0]["last-delivered-id"] == last_id:
                    break
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("mode", ["live", "paper"])
async def test_intents_past_the_core_that_break_a_rule_are_dead_lettered_and_never_sent(
        sim: SimHandle, rest: BitvavoRest, client: redis.asyncio.Redis, redis_db_url: str, tmp_path: Path,
        mode: str) -> None:
    dry_run = mode == "paper"
    settings = _settings(sim, tmp_path, dry_run=dry_run)
    [rules] = [r for r in rules_from_markets(rest.markets()) if r.market == MARKET]
    market = sim.stats()["markets"][MARKET]
    bid, ask = D(market["best_bid"]), D(market["best_ask"])
    poisoned = _poisoned(dry_run, rules, bid, ask)
    normal = _intent(dry_run, order_type="market", amount_quote=D("10"))
    await _write(client, [*poisoned.values(), normal])
    orders_before = {o.order_id for o in rest.orders(MARKET)}

    venue: LiveVenue | PaperVenue
    if dry_run:
        venue = PaperVenue.from_settings(settings, (MARKET,))
    else:
        venue = LiveVenue(client, settings, rest=BitvavoRest(
            sim.rest_url, api_key=SecretStr(sim.api_key), api_secret=SecretStr(sim.api_secret),
            operator_id=OPERATOR, governor=RateGovernor()))
    await _run_until_handled(settings, redis_db_url, venue, client)

    letters = [decode_entry(f) for _id, f in await client.xrange(dead_letter_stream(ORDERS_SHADOW))]
    dead = {orjson.loads(letter["fields"])["intent_id"]: letter for letter in letters}
    events = {e["intent_id"]: e for e in await read_events(client) if e["type"] == "intent_refused_by_executor"}
    for name, intent in poisoned.items():
        letter = dead[intent.intent_id]
        assert letter["cause"] == "rejected" and f"{EXPECTED_RULE[name]}:" in letter["reason"], name
        assert EXPECTED_CODE[name] in letter["reason"], (name, letter["reason"])
        event = events[intent.intent_id]
        assert event["severity"] == "critical" and event["detail"]["rule"] == EXPECTED_RULE[name], name
    assert set(dead) == {i.intent_id for i in poisoned.values()}
    # Released: no report will ever come for them. The normal one waits for the PnL loop.
    assert await client.hkeys(KEY_OPEN_INTENTS) == [normal.intent_id]

    reports = [ExecutionReport.decode(f) for _id, f in await client.xrange(ORDERS_EXECUTED)]
    assert [(r.intent_id, r.status) for r in reports] == [(normal.intent_id, "filled")]
    new_orders = [o for o in rest.orders(MARKET) if o.order_id not in orders_before]
    if dry_run:
        assert isinstance(venue, PaperVenue) and venue.stats.orders_placed == 1 and venue.stats.rejected == 0
        assert new_orders == []  # paper: nothing at the exchange at all
    else:
        assert isinstance(venue, LiveVenue) and venue.stats.orders_sent == 1
        assert [o.client_order_id for o in new_orders] == [normal.intent_id]
