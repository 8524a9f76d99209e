"""The live venue against the simulator (a real Bitvavo-compatible exchange process) and real Redis.

Faults come from the simulator's control API: a 5xx or a hang on the order call, with or without
the order being executed first. The process kill is real: a child process runs the executor
loop, sends the order, and `os._exit(1)`s before the report is recorded.

`_record` does what the executor does with reports, in one transaction: XADD `orders:executed`
and HDEL `orders:inflight`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio
from pydantic import SecretStr

from tests.integration.conftest import REPO_ROOT, SimHandle
from trading.bus import (
    KEY_INFLIGHT,
    KEY_KILL,
    KEY_OPEN_INTENTS,
    KEY_PNL_LIVE,
    ORDERS_EXECUTED,
    ORDERS_SHADOW,
    dead_letter_stream,
)
from trading.clock import now_ms
from trading.config import Settings
from trading.events import read_events
from trading.exchange.governor import RateGovernor
from trading.exchange.models import Order
from trading.exchange.rest import BitvavoRest
from trading.execution.executor import run_executor
from trading.execution.live import KEY_LIVE_OPEN, SENT_PREFIX, LiveVenue, SendFencedError
from trading.flatten import flatten_intent
from trading.golive import record_decision
from trading.lease import LEASE_KEY_PREFIX, Lease, RedisLease, fencing_key
from trading.orders import ExecutionReport, Intent, OrderOutcomeUnknownError, intent_id_for
from trading.processes import stop_process

pytestmark = pytest.mark.integration

D = Decimal
MARKET = "BTC-EUR"
OPERATOR = 4242
WINDOW_MS = 1000  # Bitvavo-Access-Window: after it (+ margin) a missing order provably was not created
VENUE_OPTIONS: dict[str, Any] = {"request_timeout_s": 0.5, "uncertainty_margin_ms": 300, "lookup_grace_ms": 1000,
                                 "poll_interval_s": 0.05, "reconcile_interval_s": 0.2}


def _settings(sim: SimHandle, tmp_path: Path) -> Settings:
    return Settings(parquet_dir=tmp_path / "lake", ingest_markets=(MARKET,), dry_run=False,
                    bitvavo_rest_url=sim.rest_url, bitvavo_ws_url=sim.ws_url,
                    bitvavo_api_key=SecretStr(sim.api_key), bitvavo_api_secret=SecretStr(sim.api_secret),
                    bitvavo_operator_id=OPERATOR, bitvavo_access_window_ms=WINDOW_MS)


def _rest(sim: SimHandle, governor: RateGovernor) -> BitvavoRest:
    # A governor per test: the simulator's budget is reset per test too (see `exchange`).
    return BitvavoRest(sim.rest_url, api_key=SecretStr(sim.api_key), api_secret=SecretStr(sim.api_secret),
                       operator_id=OPERATOR, governor=governor, timeout_s=VENUE_OPTIONS["request_timeout_s"],
                       access_window_ms=WINDOW_MS, max_retries=1, retry_base_s=0.05)


@pytest.fixture
def exchange(sim: SimHandle) -> Iterator[SimHandle]:
    """The module's simulator, left as found: no open orders, no pending faults, feed running."""
    governor = RateGovernor()
    sim.control(clear=True, reset_rate_limits=True)
    cleaner = _rest(sim, governor)
    cleaner.cancel_orders()
    try:
        yield sim
    finally:
        sim.control(clear=True, reset_rate_limits=True)
        cleaner.cancel_orders()
        cleaner.close()


@pytest.fixture
def client(live_client: redis.asyncio.Redis) -> redis.asyncio.Redis:
    """The test's Redis, with the go-live gate open (the venue re-checks it right before sending)."""
    return live_client


@pytest.fixture
def rest(exchange: SimHandle) -> Iterator[BitvavoRest]:
    """Our own view of the exchange account (the venues get their own clients)."""
    view = _rest(exchange, RateGovernor())
    try:
        yield view
    finally:
        view.close()


@pytest.fixture
async def venues(exchange: SimHandle, client: redis.asyncio.Redis, tmp_path: Path
                 ) -> AsyncIterator[Callable[[], LiveVenue]]:
    """`venues()` builds a LiveVenue on the simulator, fenced by one lease held for the test (as the executor
    fences its venue with its own); each is closed at the end."""
    made: list[tuple[LiveVenue, BitvavoRest]] = []
    governor = RateGovernor()
    keeper = RedisLease(client, "live-venue-test")
    lease = await keeper.acquire()

    def make() -> LiveVenue:
        rest = _rest(exchange, governor)
        venue = LiveVenue(client, _settings(exchange, tmp_path), rest=rest, **VENUE_OPTIONS)
        venue.fence(lease)
        made.append((venue, rest))
        return venue

    try:
        yield make
    finally:
        for venue, rest in made:
            await venue.close()
            rest.close()
        await keeper.release()


def _intent(order_type: str = "market", *, amount: Decimal | None = None, amount_quote: Decimal | None = None,
            price: Decimal | None = None, side: str = "buy") -> Intent:
    signal_id = str(uuid.uuid4())
    if order_type == "market" and amount is None and amount_quote is None:
        amount_quote = D("10")
    return Intent(intent_id=intent_id_for(signal_id), signal_id=signal_id, market=MARKET, side=side,  # type: ignore[arg-type]
                  order_type=order_type, time_in_force="GTC", dry_run=False, ts=now_ms(),  # type: ignore[arg-type]
                  amount=amount, amount_quote=amount_quote, price=price)


async def _record(client: redis.asyncio.Redis, reports: list[ExecutionReport]) -> None:
    """What the executor does with reports, in one transaction."""
    async with client.pipeline(transaction=True) as tx:
        for report in reports:
            tx.xadd(ORDERS_EXECUTED, report.encode())  # type: ignore[arg-type]
            tx.hdel(KEY_INFLIGHT, report.intent_id)
        await tx.execute()


async def _executed(client: redis.asyncio.Redis, intent_id: str) -> list[ExecutionReport]:
    reports = [ExecutionReport.decode(fields) for _id, fields in await client.xrange(ORDERS_EXECUTED)]
    return [r for r in reports if r.intent_id == intent_id]


def _orders_for(rest: BitvavoRest, intent: Intent) -> list[Order]:
    return [o for o in rest.orders(MARKET) if o.client_order_id == intent.intent_id]


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.02)


async def _settled_poll(venue: LiveVenue) -> list[ExecutionReport]:
    """poll() once its follow-up spacing (≥ 200 ms per followed order) has passed."""
    await asyncio.sleep(0.25)
    return await venue.poll()


def _best_bid(sim: SimHandle) -> Decimal:
    return D(sim.stats()["markets"][MARKET]["best_bid"])


def _fill_at_exchange(sim: SimHandle, rest: BitvavoRest, order_id: str) -> Order:
    """Move the (paused) market until the resting order has traded."""
    for _ in range(100):
        sim.step(20)
        order = rest.get_order(MARKET, order_id=order_id)
        if order.status == "filled":
            return order
    raise AssertionError("the resting order never filled")


async def test_kill_switch_and_gate_are_checked_at_the_moment_of_sending(
        venues: Callable[[], LiveVenue], client: redis.asyncio.Redis, rest: BitvavoRest) -> None:
    venue = venues()
    await venue.start()
    await client.set(KEY_KILL, "1")  # flipped after the executor's own check, before the send
    killed = _intent()
    [report] = await venue.submit(killed)
    assert report.status == "rejected" and "kill switch" in (report.reason or "")
    await client.delete(KEY_KILL)
    await record_decision(client, decision="NO-GO", operator="preflight", reason="NO-GO", decided_ms=now_ms(),
                          valid_for_ms=1)
    gated = _intent()
    [report] = await venue.submit(gated)
    assert report.status == "rejected" and "gate closed" in (report.reason or "")
    assert _orders_for(rest, killed) == [] and _orders_for(rest, gated) == []
    assert not await client.hexists(KEY_INFLIGHT, killed.intent_id)


async def test_an_intent_another_instance_claimed_is_looked_up_not_sent_again(
        venues: Callable[[], LiveVenue], client: redis.asyncio.Redis, rest: BitvavoRest) -> None:
    first, second = venues(), venues()  # e.g. a stalled holder and its successor
    await first.start()
    await second.start()
    intent = _intent()
    # Both read "not in flight" at once; the atomic claim lets exactly one of them send.
    reports = await asyncio.gather(first.submit(intent), second.submit(intent))
    [order] = _orders_for(rest, intent)
    assert {r.order_id for batch in reports for r in batch} == {order.order_id}


async def test_order_is_sent_once_with_client_order_id_and_operator_id(
        venues: Callable[[], LiveVenue], client: redis.asyncio.Redis, rest: BitvavoRest, exchange: SimHandle,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    venue = venues()
    await venue.start()
    assert venue.blocked_reason() is None
    intent = _intent()
    [report] = await venue.submit(intent)

    [order] = _orders_for(rest, intent)
    assert order.operator_id == OPERATOR
    assert (report.status, report.order_id, report.dry_run) == ("filled", order.order_id, False)
    assert report.fills and {f.fill_id for f in report.fills} == {f.fill_id for f in order.fills}
    assert report.fee == order.fee_paid > 0 and report.filled_amount == order.filled_amount
    inflight = orjson.loads(await client.hget(KEY_INFLIGHT, intent.intent_id))  # recorded before sending
    assert inflight["intent_id"] == intent.intent_id and inflight["sent_ms"] <= order.created

    # The executor's transaction failed, so the consumer hands the intent over again: same report, no new order.
    assert await venue.submit(intent) == [report]
    assert len(_orders_for(rest, intent)) == 1

    await _record(client, [report])
    assert await client.hlen(KEY_INFLIGHT) == 0
    assert await _settled_poll(venue) == []  # sees the recording: the final order is no longer followed
    assert await client.hlen(KEY_LIVE_OPEN) == 0
    assert await venue.submit(intent) == []  # a redelivered, recorded intent is not sent again
    assert len(_orders_for(rest, intent)) == 1

    # The credentials never reach Redis or the logs.
    secrets = (exchange.api_key, exchange.api_secret)
    stored = [str(v) for key in await client.keys("*") if await client.type(key) == "hash"
              for v in (await client.hgetall(key)).values()]
    stored += [str(e) for e in await read_events(client)] + [str(r) for r in await _executed(client, intent.intent_id)]
    assert not any(secret in text for secret in secrets for text in [*stored, caplog.text, repr(venue)])


@pytest.mark.parametrize(("fault", "executed"), [
    ("5xx:101", True), ("5xx:111", True), ("5xx:101", False), ("timeout", True), ("timeout", False)])
async def test_uncertain_submit_is_looked_up_by_client_order_id_never_duplicated(
        venues: Callable[[], LiveVenue], client: redis.asyncio.Redis, rest: BitvavoRest, exchange: SimHandle,
        fault: str, executed: bool) -> None:
    venue = venues()
    await venue.start()
    orders_before = len(rest.orders(MARKET))
    intent = _intent()
    if fault == "timeout":
        exchange.hang_next(1, seconds=1.0, execute=executed)
    else:
        exchange.fail_next(1, error_code=int(fault.split(":")[1]), execute=executed)
    submit = asyncio.create_task(venue.submit(intent))
    # While the order call is outstanding the intent is already in flight.
    await _until(lambda: client.hexists(KEY_INFLIGHT, intent.intent_id))
    if fault == "timeout":
        assert not submit.done()  # the order call is still hanging: the intent was in flight before it
    [report] = await submit

    orders = _orders_for(rest, intent)
    assert len(rest.orders(MARKET)) == orders_before + len(orders)
    if executed:
        [order] = orders
        assert report.status == "filled" and report.order_id == order.order_id and report.fills
    else:
        assert orders == []
        assert report.status == "rejected" and report.order_id == "" and "240" in (report.reason or "")
    [event] = [e for e in await read_events(client) if e["type"] == "order_uncertain"]
    assert event["intent_id"] == intent.intent_id
    assert event["detail"]["outcome"] == ("found" if executed else "not_created")

    await _record(client, [report])
    assert await venue.submit(intent) == [] and await _settled_poll(venue) == []
    assert len(_orders_for(rest, intent)) == len(orders)  # never resent
    assert venue.blocked_reason() is None


async def test_order_showing_up_late_within_the_uncertainty_window_is_found(
        venues: Callable[[], LiveVenue], client: redis.asyncio.Redis, rest: BitvavoRest, exchange: SimHandle) -> None:
    """The first lookups say 240, then the exchange has the order (it processed the request late)."""
    venue = venues()
    await venue.start()
    intent = _intent()
    exchange.fail_next(1, error_code=101, execute=False)
    submit = asyncio.create_task(venue.submit(intent))
    await asyncio.sleep(0.3)  # well inside access window + margin (1.3 s)
    late = await asyncio.to_thread(rest.place_order, MARKET, "buy", "market", amount_quote=D("10"),
                                   client_order_id=intent.intent_id)
    [report] = await submit
    assert report.status == "filled" and report.order_id == late.order_id
    assert len(_orders_for(rest, intent)) == 1


async def test_intent_already_in_flight_is_looked_up_not_sent_again(
        venues: Callable[[], LiveVenue], client: redis.asyncio.Redis, rest: BitvavoRest) -> None:
    """The executor died after recording in flight: once before sending, once after."""
    sent, unsent = _intent(), _intent()
    placed = rest.place_order(MARKET, "buy", "market", amount_quote=D("10"), client_order_id=sent.intent_id)
    long_ago = now_ms() - 60_000
    for intent in (sent, unsent):
        await client.hset(KEY_INFLIGHT, intent.intent_id, orjson.dumps({**intent.encode(), "sent_ms": long_ago}))
    venue = venues()
    await venue.start()  # reconciliation looks both up; the redelivered intents get the reports
    [found] = await venue.submit(sent)
    [rejected] = await venue.submit(unsent)
    assert found.status == "filled" and found.order_id == placed.order_id and found.fills
    assert rejected.status == "rejected" and "not resent" in (rejected.reason or "")
    assert [o.order_id for o in _orders_for(rest, sent)] == [placed.order_id] and _orders_for(rest, unsent) == []
    assert await venue.poll() == []  # handed out once, by submit
    await _record(client, [found, rejected])
    assert await client.hlen(KEY_INFLIGHT) == 0 and venue.blocked_reason() is None


_DIES_AFTER_SENDING = """
import asyncio, os
from trading.config import Settings
from trading.execution.executor import run_executor
from trading.execution.live import LiveVenue
from trading.redis_conn import async_client

class DiesAfterSending(LiveVenue):
    async def submit(self, intent):
        await super().submit(intent)  # recorded in flight, sent, answered
        os._exit(1)  # the process dies before the executor records the report

async def main():
    settings = Settings.from_env()
    client = async_client(settings.redis_url)
    venue = DiesAfterSending(client, settings, request_timeout_s=2.0)
    await run_executor(settings, redis_url=settings.redis_url, venue=venue, duration_s=20, metrics_port=0,
                       max_intent_age_s=60)

asyncio.run(main())
"""


@pytest.mark.parametrize("redelivered_to", ["submit", "poll"])
async def test_executor_killed_after_sending_restarts_with_one_order_and_one_execution(
        exchange: SimHandle, client: redis.asyncio.Redis, rest: BitvavoRest, redis_db_url: str, tmp_path: Path,
        redelivered_to: str) -> None:
    settings = _settings(exchange, tmp_path)
    await record_decision(client, decision="GO", operator="test", reason="test", decided_ms=now_ms(),
                          valid_for_ms=3_600_000)
    intent = _intent()
    async with client.pipeline(transaction=True) as tx:  # what the trading core writes
        tx.xadd(ORDERS_SHADOW, intent.encode())  # type: ignore[arg-type]
        tx.hset(KEY_OPEN_INTENTS, intent.intent_id, orjson.dumps({"market": MARKET, "side": "buy", "ts": intent.ts}))
        await tx.execute()
    script = tmp_path / "dies_after_sending.py"
    script.write_text(textwrap.dedent(_DIES_AFTER_SENDING))
    env = {**os.environ, "REDIS_URL": redis_db_url, "DRY_RUN": "false", "PARQUET_DIR": str(tmp_path / "lake"),
           "BITVAVO_REST_URL": exchange.rest_url, "BITVAVO_API_KEY": exchange.api_key,
           "BITVAVO_API_SECRET": exchange.api_secret, "BITVAVO_OPERATOR_ID": str(OPERATOR),
           "BITVAVO_ACCESS_WINDOW_MS": str(WINDOW_MS), "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, str(script)], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=30)
    finally:
        stop_process(process)
    assert process.returncode == 1, stderr
    assert len(_orders_for(rest, intent)) == 1  # sent...
    assert await _executed(client, intent.intent_id) == []  # ...never recorded
    assert await client.hexists(KEY_INFLIGHT, intent.intent_id)

    # Restart. The redelivered intent is in flight, so it is never refused (not even when older than
    # max_intent_age_s, the "poll" variant): it reaches the venue, which hands it reconciliation's report.
    await client.pexpire(LEASE_KEY_PREFIX + "executor", 1)  # the dead holder's lease runs out (TTL 15 s)
    await asyncio.sleep(0.01)
    venue = LiveVenue(client, settings, rest=_rest(exchange, RateGovernor()), **VENUE_OPTIONS)
    await run_executor(settings, redis_url=redis_db_url, venue=venue, duration_s=2.0, metrics_port=0,
                       poll_interval_s=0.05, max_intent_age_s=60 if redelivered_to == "submit" else 0.001)

    [order] = _orders_for(rest, intent)
    [report] = await _executed(client, intent.intent_id)
    assert (report.status, report.order_id) == ("filled", order.order_id)
    assert {f.fill_id for f in report.fills} == {f.fill_id for f in order.fills}
    assert await client.hlen(KEY_INFLIGHT) == 0  # the open intent waits for the PnL loop's booking
    assert await client.hkeys(KEY_OPEN_INTENTS) == [intent.intent_id]
    assert (await client.xpending(ORDERS_SHADOW, "executor"))["pending"] == 0
    refusals = {e["type"] for e in await read_events(client)} & {"intent_expired", "venue_blocked"}
    assert refusals == set()


async def test_resting_order_filled_while_the_venue_was_down_is_found_by_reconciliation(
        venues: Callable[[], LiveVenue], client: redis.asyncio.Redis, rest: BitvavoRest,
        exchange: SimHandle) -> None:
    exchange.pause_feed()
    first = venues()
    await first.start()
    intent = _intent("limit", amount=D("0.0001"), price=_best_bid(exchange) - 2)  # GTC, away from the touch
    [accepted] = await first.submit(intent)
    assert accepted.status == "new" and accepted.fills == ()
    await _record(client, [accepted])
    assert await _settled_poll(first) == []  # resting, nothing new
    await first.close()

    order = _fill_at_exchange(exchange, rest, accepted.order_id)  # while no venue runs

    second = venues()
    await second.start()
    assert second.blocked_reason() is None
    [summary] = [e["detail"] for e in await read_events(client) if e["detail"].get("kind") == "summary"][-1:]
    assert summary["closed_while_away"] == 1 and summary["followed"] == 1
    [filled] = await second.poll()
    assert (filled.status, filled.order_id, filled.filled_amount) == ("filled", order.order_id, D("0.0001"))
    assert [f.fill_id for f in filled.fills] == [f.fill_id for f in order.fills] and filled.fee == order.fee_paid
    await _record(client, [filled])
    assert await _settled_poll(second) == []
    assert await client.hlen(KEY_LIVE_OPEN) == 0 and await client.hlen(KEY_INFLIGHT) == 0
    assert [r.status for r in await _executed(client, intent.intent_id)] == ["new", "filled"]


async def test_open_order_filling_later_is_reported_once_by_poll(
        venues: Callable[[], LiveVenue], client: redis.asyncio.Redis, rest: BitvavoRest,
        exchange: SimHandle) -> None:
    exchange.pause_feed()
    venue = venues()
    await venue.start()
    intent = _intent("limit", amount=D("0.0001"), price=_best_bid(exchange) - 2)
    [accepted] = await venue.submit(intent)
    assert await venue.poll() == []  # its first report is not recorded yet: nothing is followed
    await _record(client, [accepted])
    order = _fill_at_exchange(exchange, rest, accepted.order_id)
    [filled] = await _settled_poll(venue)
    assert filled.status == "filled" and [f.fill_id for f in filled.fills] == [f.fill_id for f in order.fills]
    assert await _settled_poll(venue) == []  # handed out, not recorded yet: not reported twice

    # The executor died before recording it: after a restart the same fill is reported again, once.
    restarted = venues()
    await restarted.start()
    [again] = await restarted.poll()
    assert again == filled
    await _record(client, [again])
    assert await _settled_poll(restarted) == [] and await client.hlen(KEY_LIVE_OPEN) == 0


async def test_unknown_open_order_blocks_live_orders_until_resolved(
        venues: Callable[[], LiveVenue], client: redis.asyncio.Redis, rest: BitvavoRest,
        exchange: SimHandle) -> None:
    foreign = rest.place_order(MARKET, "buy", "limit", amount=D("0.0001"), price=_best_bid(exchange) - 500,
                               time_in_force="GTC")
    venue = venues()
    await venue.start()
    blocked = venue.blocked_reason()
    assert blocked is not None and f"unknown_open_order:{foreign.order_id}" in blocked
    critical = [e for e in await read_events(client) if e["type"] == "reconcile" and e["severity"] == "critical"]
    unknown = [e for e in critical if e["detail"]["kind"] == "unknown_open_order"]
    assert [e["detail"]["order_id"] for e in unknown] == [foreign.order_id]
    assert any(e["detail"]["kind"] == "balance_in_order" and e["detail"]["symbol"] == "EUR" for e in critical)
    [summary] = [e for e in critical if e["detail"]["kind"] == "summary"]
    assert summary["detail"]["balances"]["EUR"]["in_order"] == str(foreign.decimals["onHold"])

    intent = _intent()
    [refused] = await venue.submit(intent)  # the executor checks blocked_reason() first; the venue too
    assert refused.status == "rejected" and "not sent" in (refused.reason or "") and _orders_for(rest, intent) == []

    await asyncio.sleep(0.25)
    await venue.poll()  # still there: re-reconciled while blocked, no new events
    assert venue.blocked_reason() is not None
    assert len([e for e in await read_events(client) if e["type"] == "reconcile"]) == len(critical)

    rest.cancel_order(MARKET, order_id=foreign.order_id)
    await asyncio.sleep(0.25)
    await venue.poll()  # re-reconciled while blocked: resolved
    assert venue.blocked_reason() is None
    [resolved] = [e for e in await read_events(client) if e["type"] == "reconcile" and e["severity"] == "info"]
    assert resolved["detail"]["kind"] == "resolved"
    assert await venue.reconcile() == []


async def test_unreachable_exchange_after_sending_blocks_until_reconciled(
        venues: Callable[[], LiveVenue], client: redis.asyncio.Redis, rest: BitvavoRest,
        exchange: SimHandle) -> None:
    venue = venues()
    await venue.start()
    intent = _intent()
    exchange.fail_next(1000, error_code=101, execute=True)  # the order goes through; every lookup fails
    with pytest.raises(OrderOutcomeUnknownError):
        await venue.submit(intent)
    blocked = venue.blocked_reason()
    assert blocked is not None and intent.intent_id in blocked
    assert await client.hexists(KEY_INFLIGHT, intent.intent_id)

    exchange.control(clear=True)
    await asyncio.sleep(0.25)
    [report] = await venue.poll()  # reconciled from poll() while blocked
    [order] = _orders_for(rest, intent)
    assert report.status == "filled" and report.order_id == order.order_id
    assert venue.blocked_reason() is None
    await _record(client, [report])
    assert await venue.submit(intent) == [] and len(_orders_for(rest, intent)) == 1


async def test_exchange_refusal_is_a_rejected_report(
        venues: Callable[[], LiveVenue], client: redis.asyncio.Redis, rest: BitvavoRest) -> None:
    venue = venues()
    await venue.start()
    intent = _intent(amount_quote=D("5000000"))  # far beyond the account's EUR
    [report] = await venue.submit(intent)
    assert report.status == "rejected" and "[216]" in (report.reason or "")
    assert _orders_for(rest, intent) == []
    await _record(client, [report])
    assert await venue.submit(intent) == [] and venue.blocked_reason() is None


async def test_a_flatten_sale_passes_the_kill_switch_and_the_gate_at_the_send_claim_only_within_the_ledger(
        venues: Callable[[], LiveVenue], client: redis.asyncio.Redis, rest: BitvavoRest) -> None:
    venue = venues()
    await venue.start()
    await client.hset(KEY_PNL_LIVE, f"{MARKET}:position", "0.0002")
    await client.set(KEY_KILL, "1")
    await record_decision(client, decision="NO-GO", operator="preflight", reason="NO-GO", decided_ms=now_ms(),
                          valid_for_ms=1)
    beyond = flatten_intent(MARKET, D("0.0003"), dry_run=False, scope="ledger", ts=now_ms())
    [refused] = await venue.submit(beyond)
    assert refused.status == "rejected" and "beyond the live ledger position" in (refused.reason or "")
    trade = _intent(side="sell", amount=D("0.0002"))
    [killed] = await venue.submit(trade)
    assert killed.status == "rejected" and "kill switch" in (killed.reason or "")
    within = flatten_intent(MARKET, D("0.0002"), dry_run=False, scope="ledger", ts=now_ms())
    [sold] = await venue.submit(within)
    [order] = _orders_for(rest, within)
    assert (sold.status, sold.order_id, order.side) == ("filled", order.order_id, "sell")
    assert _orders_for(rest, beyond) == _orders_for(rest, trade) == []


OUTAGE_FAULTS: dict[str, dict[str, Any]] = {
    "hung calls": {"rest_timeouts": {"count": 10_000, "seconds": 0.6}},  # /time samples and REST calls hang
    "5xx": {"rest_errors": {"count": 10_000, "error_code": 111}},
    "slow answers": {"rest_delays": {"count": 10_000, "seconds": 1.2}},  # executed, answered too late
}


@pytest.mark.parametrize("outage", sorted(OUTAGE_FAULTS))
async def test_an_exchange_that_does_not_answer_at_start_leaves_no_dead_letter_and_the_fill_reaches_the_stream(
        exchange: SimHandle, client: redis.asyncio.Redis, rest: BitvavoRest, redis_db_url: str, tmp_path: Path,
        outage: str) -> None:
    """Issue 14: a restarted executor that could not reconcile dead-lettered an intent whose order had filled."""
    settings = _settings(exchange, tmp_path)
    intent = _intent()
    placed = rest.place_order(MARKET, "buy", "market", amount_quote=D("10"), client_order_id=intent.intent_id)
    async with client.pipeline(transaction=True) as tx:  # sent by an executor that died before recording it
        tx.hset(KEY_INFLIGHT, intent.intent_id, orjson.dumps({**intent.encode(), "sent_ms": now_ms() - 60_000}))
        tx.xadd(ORDERS_SHADOW, intent.encode())  # type: ignore[arg-type]
        tx.hset(KEY_OPEN_INTENTS, intent.intent_id, orjson.dumps({"market": MARKET, "side": "buy", "ts": intent.ts}))
        await tx.execute()
    exchange.control(**OUTAGE_FAULTS[outage])
    venue = LiveVenue(client, settings, rest=_rest(exchange, RateGovernor()), **VENUE_OPTIONS)
    task = asyncio.create_task(run_executor(settings, redis_url=redis_db_url, venue=venue, metrics_port=0,
                                            poll_interval_s=0.05, max_intent_age_s=60))
    try:
        await asyncio.sleep(6.0)  # start, clock sync, reconciliation and the intent's lookups all fail
        assert venue.blocked_reason() is not None and await _executed(client, intent.intent_id) == []
        exchange.control(clear=True)  # the exchange answers again: nobody restarts anything

        async def reported() -> bool:
            return bool(await _executed(client, intent.intent_id))

        await _until(reported, timeout_s=20)
        await _until(lambda: _async(venue.blocked_reason() is None), timeout_s=5)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    [report] = await _executed(client, intent.intent_id)
    assert (report.status, report.order_id) == ("filled", placed.order_id)
    order = rest.get_order(MARKET, order_id=placed.order_id)
    assert {f.fill_id for f in report.fills} == {f.fill_id for f in order.fills}
    assert await client.xlen(dead_letter_stream(ORDERS_SHADOW)) == 0
    assert await client.hlen(KEY_INFLIGHT) == 0 and len(_orders_for(rest, intent)) == 1  # never resent
    assert (await client.xpending(ORDERS_SHADOW, "executor"))["pending"] == 0


async def _async(value: bool) -> bool:
    return value


# -- the lease fence on the send claim --------------------------------------------------------------


async def test_a_send_after_another_instance_acquired_the_lease_is_refused_and_left_to_that_instance(
        exchange: SimHandle, client: redis.asyncio.Redis, rest: BitvavoRest, tmp_path: Path) -> None:
    settings, governor = _settings(exchange, tmp_path), RateGovernor()
    stalled = LiveVenue(client, settings, rest=_rest(exchange, governor), **VENUE_OPTIONS)
    successor = LiveVenue(client, settings, rest=_rest(exchange, governor), **VENUE_OPTIONS)
    try:
        first = await RedisLease(client, "executor").acquire()
        stalled.fence(first)
        await stalled.start()
        # The stalled holder's lease runs out (its key is gone) and a second instance acquires it.
        await client.delete(LEASE_KEY_PREFIX + "executor")
        taken = await RedisLease(client, "executor").acquire()
        assert taken.fencing_token == first.fencing_token + 1
        successor.fence(taken)
        await successor.start()

        intent = _intent()
        with pytest.raises(SendFencedError, match=rf"fencing counter is {taken.fencing_token}, this instance holds "
                                                  rf"token {first.fencing_token}"):
            await stalled.submit(intent)
        assert _orders_for(rest, intent) == [] and stalled.stats.orders_sent == 0 and stalled.stats.fenced == 1
        assert not await client.hexists(KEY_INFLIGHT, intent.intent_id)  # nothing claimed: the intent is free
        assert not await client.exists(SENT_PREFIX + intent.intent_id)
        [event] = [e for e in await read_events(client) if e["type"] == "send_fenced"]
        assert (event["severity"], event["intent_id"]) == ("critical", intent.intent_id)
        assert event["detail"]["counter"] == str(taken.fencing_token)

        [report] = await successor.submit(intent)  # the lease holder sends it, once
        [order] = _orders_for(rest, intent)
        assert (report.status, report.order_id) == ("filled", order.order_id)
    finally:
        for venue in (stalled, successor):
            await venue.close()


async def test_the_fence_follows_the_lease_when_it_is_reacquired_under_a_new_token(
        exchange: SimHandle, client: redis.asyncio.Redis, rest: BitvavoRest, tmp_path: Path) -> None:
    settings, governor = _settings(exchange, tmp_path), RateGovernor()
    venue = LiveVenue(client, settings, rest=_rest(exchange, governor), **VENUE_OPTIONS)
    stale = LiveVenue(client, settings, rest=_rest(exchange, governor), **VENUE_OPTIONS)
    try:
        keeper = RedisLease(client, "executor")
        initial = await keeper.acquire()
        venue.fence(initial)  # as the executor does: with the lease it held when the loop started
        await venue.start()
        await client.delete(LEASE_KEY_PREFIX + "executor")  # lost with Redis's data; nobody else took it
        again = await keeper.reacquire()
        assert again.fencing_token == initial.fencing_token + 1 and initial.current() == again

        intent = _intent()
        [report] = await venue.submit(intent)  # the claim uses the token held now, not the initial one
        [order] = _orders_for(rest, intent)
        assert report.order_id == order.order_id and venue.stats.fenced == 0

        # An instance still on the initial token (no keeper to follow) is fenced out.
        stale.fence(Lease(initial.name, initial.fencing_token, initial.holder))
        await stale.start()
        other = _intent()
        with pytest.raises(SendFencedError):
            await stale.submit(other)
        assert _orders_for(rest, other) == []
    finally:
        for each in (venue, stale):
            await each.close()


class _TakenOverBeforeSending(LiveVenue):
    """Another executor acquires the lease just before this one sends: the fencing counter moves on. (Here the
    counter only: the lease key stays this instance's, so its lease keeper sees nothing and only the fence can.)"""

    async def submit(self, intent: Intent) -> list[ExecutionReport]:
        await self._client.incr(fencing_key("executor"))
        return await super().submit(intent)


async def test_an_executor_fenced_out_at_the_send_stops_recording_nothing_and_the_next_one_sends_the_intent(
        exchange: SimHandle, client: redis.asyncio.Redis, rest: BitvavoRest, redis_db_url: str,
        tmp_path: Path) -> None:
    settings = _settings(exchange, tmp_path)
    intent = _intent()
    async with client.pipeline(transaction=True) as tx:  # what the trading core writes
        tx.xadd(ORDERS_SHADOW, intent.encode())  # type: ignore[arg-type]
        tx.hset(KEY_OPEN_INTENTS, intent.intent_id, orjson.dumps({"market": MARKET, "side": "buy", "ts": intent.ts}))
        await tx.execute()
    fenced = _TakenOverBeforeSending(client, settings, rest=_rest(exchange, RateGovernor()), **VENUE_OPTIONS)
    with pytest.raises(SendFencedError):
        async with asyncio.timeout(60):
            await run_executor(settings, redis_url=redis_db_url, venue=fenced, metrics_port=0, poll_interval_s=0.05,
                               max_intent_age_s=60)
    assert fenced.stats.fenced == 1 and _orders_for(rest, intent) == []
    assert await _executed(client, intent.intent_id) == [] and await client.xlen(dead_letter_stream(ORDERS_SHADOW)) == 0
    assert (await client.xpending(ORDERS_SHADOW, "executor"))["pending"] == 1  # left for the lease holder
    assert [e["intent_id"] for e in await read_events(client) if e["type"] == "send_fenced"] == [intent.intent_id]

    venue = LiveVenue(client, settings, rest=_rest(exchange, RateGovernor()), **VENUE_OPTIONS)
    task = asyncio.create_task(run_executor(settings, redis_url=redis_db_url, venue=venue, metrics_port=0,
                                            poll_interval_s=0.05, max_intent_age_s=60))
    try:
        async def reported() -> bool:
            return bool(await _executed(client, intent.intent_id))

        await _until(reported, timeout_s=30)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    [order] = _orders_for(rest, intent)
    [report] = await _executed(client, intent.intent_id)
    assert (report.status, report.order_id) == ("filled", order.order_id)
    assert (await client.xpending(ORDERS_SHADOW, "executor"))["pending"] == 0
