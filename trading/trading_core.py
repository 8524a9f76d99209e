"""The trading core loop: signals in, risk-checked order intents out (docs/trading-core.md).

Per signal (`SIGNAL_STREAM`, consumer group `trading-core`):
1. parse it; a bad signal (missing field, not a decimal, negative price, unknown market, side
   not buy/sell) is a `RejectEntry` and goes to `<stream>:dead`;
2. skip it when its `signal_id` was already decided (idempotency mark of the group);
3. read the guards' context from Redis in ONE pipelined round trip (the ledger of the mode the
   core trades in: `trading:pnl:paper` in dry-run, `trading:pnl:live` live);
4. size the order (pure), run the guards (`trading.risk.evaluate`, pure);
5. queue, in the transaction that also acks the signal: the idempotency mark, one event
   (`intent`, or `reject` / `kill_switch` naming the first failing guard, with every guard's
   outcome), and for a passing intent the `orders:shadow` entry, its `trading:intents:open`
   field and the market's last-intent time;
6. once that transaction committed, append the intent and the event to the lake.

Sizing: a limit IOC order, priced at the estimated far touch (ref_price ± half the signal's
spread) plus `slippage_bps`, so it is marketable but cannot fill beyond that bound and never
rests. The amount is `order_notional` EUR at the signal's `ref_price`, a sell capped at the
inventory (the position less the sells still open: spot, never sell what the bot does not
hold; below the market minimum it is refused as `no_inventory`), rounded DOWN to the
market's `quantityDecimals`; the price is rounded to the market's `tickSize` in the direction
that keeps the bound. Without market rules (GET /markets unreachable), 5 significant digits
(Bitvavo's former price precision, from which today's tick sizes derive) and at most 8 decimals
are used instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter as Tally
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import orjson
import redis.asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from trading.bus import (
    KEY_GOLIVE,
    KEY_KILL,
    KEY_OPEN_GAPS,
    KEY_OPEN_INTENTS,
    KEY_TRADING_STATE,
    ORDERS_SHADOW,
    SIGNAL_SCHEMA,
    EntryDecodeError,
    decode_entry,
    pnl_key,
)
from trading.clock import now_ms
from trading.config import MARKET_PATTERN, ConfigError, Settings
from trading.consumer import ConsumerMetrics, GroupConsumer, RejectEntry, StreamEntry
from trading.decimals import format_decimal
from trading.events import Severity, queue_event
from trading.exchange.errors import BitvavoError
from trading.exchange.market_rules import rules_from_markets
from trading.exchange.models import PayloadError
from trading.exchange.rest import BitvavoRest
from trading.lake import LakeFormatError, LakeWriteError, LakeWriter
from trading.loop import every, run_guarded
from trading.matching import MarketRules
from trading.metrics import LabelCache, MetricsEndpoint
from trading.orders import Intent, Side, intent_id_for
from trading.preflight import DRILL_STRATEGY
from trading.redis_conn import async_client
from trading.risk import (
    STATE_REDUCE_ONLY,
    Context,
    GuardOutcome,
    Limits,
    Proposal,
    context_from_redis,
    evaluate,
    first_failure,
    pnl_fields_for,
)

log = logging.getLogger(__name__)

LOOP_NAME = "trading-core"  # lease, consumer group and log name
KEY_LAST_INTENT = "trading:core:last_intent"  # hash market -> ms of the last intent (cooldown survives restarts)
LAKE_INTENTS = "orders/shadow"
LAKE_EVENTS = "events/trading_core"  # one writer per file: each loop has its own events channel
DEFAULT_METRICS_PORT = 9602
DEFAULT_SLIPPAGE_BPS = Decimal("10")
MAX_SLIPPAGE_BPS = Decimal("1000")
FALLBACK_SIGNIFICANT_DIGITS = 5
MAX_QUANTITY_DECIMALS = 8  # no Bitvavo asset has more
DEFAULT_MIN_ORDER_QUOTE = Decimal("5")  # minOrderInQuoteAsset of Bitvavo's EUR markets
_BPS = Decimal(10_000)


class LakeFailure(RuntimeError):
    """The lake could not be written. Not an OSError on purpose: the consumer would take that
    for Redis being down and retry quietly; this must stop the loop."""


# -- signals ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Signal:
    signal_id: str
    market: str
    side: Side
    ref_price: Decimal
    spread_bps: Decimal
    ts: int  # exchange time of the book the signal was computed from
    strategy: str


_REQUIRED_SIGNAL_FIELDS = ("signal_id", "market", "side", "ref_price", "spread_bps")


def parse_signal(fields: Mapping[str, str], known_markets: Mapping[str, MarketRules]) -> Signal:
    """A signal entry, checked; anything off-contract raises `RejectEntry` with the reason."""
    try:
        f = decode_entry(fields, SIGNAL_SCHEMA)
    except EntryDecodeError as exc:
        raise RejectEntry(f"bad signal: {exc}") from None
    missing = [name for name in _REQUIRED_SIGNAL_FIELDS if f.get(name) in (None, "")]
    if missing:
        raise RejectEntry(f"bad signal: missing {', '.join(missing)}")
    market, side = f["market"], f["side"]
    if not MARKET_PATTERN.match(market):
        raise RejectEntry(f"bad signal: market {market!r} is not a market name such as BTC-EUR")
    if known_markets and market not in known_markets:
        raise RejectEntry(f"bad signal: unknown market {market!r} (not listed by GET /markets)")
    if side not in ("buy", "sell"):
        raise RejectEntry(f"bad signal: side must be buy or sell, got {side!r}")
    if f["ref_price"] <= 0:
        raise RejectEntry(f"bad signal: ref_price must be positive, got {format_decimal(f['ref_price'])}")
    if not 0 <= f["spread_bps"] < _BPS:
        raise RejectEntry(f"bad signal: spread_bps must be in [0, 10000), got {format_decimal(f['spread_bps'])}")
    return Signal(signal_id=f["signal_id"], market=market, side=side, ref_price=f["ref_price"],
                  spread_bps=f["spread_bps"], ts=f["ts"], strategy=f.get("strategy", ""))


# -- market rules (GET /markets) --------------------------------------------------------------------

async def load_market_rules(rest_url: str, *, timeout_s: float = 5.0) -> tuple[dict[str, MarketRules], str]:
    """(rules by market, where they came from). Unreachable: ({}, why) and the loop uses fallbacks."""
    def fetch() -> Any:
        rest = BitvavoRest(rest_url, timeout_s=timeout_s, max_retries=1)
        try:
            return rest.markets()
        finally:
            rest.close()

    try:
        async with asyncio.timeout(timeout_s * 3):  # not wait_for: on 3.11 it can swallow a cancel
            rows = await asyncio.to_thread(fetch)
    except (BitvavoError, OSError, TimeoutError) as exc:
        return {}, f"GET /markets failed ({type(exc).__name__}: {exc}); fallback precision"
    try:
        rules = {rule.market: rule for rule in rules_from_markets(rows)}
    except PayloadError as exc:
        return {}, f"GET /markets answered off-schema ({exc}); fallback precision"
    skipped = len(rows) - len(rules) if isinstance(rows, list) else 0
    return rules, f"GET /markets: {len(rules)} markets" + (f", {skipped} malformed rows skipped" if skipped else "")


# -- sizing ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OrderPlan:
    amount: Decimal
    price: Decimal
    notional: Decimal  # amount x the higher of limit and reference price (EUR): the most it can cost


def _round_significant(value: Decimal, rounding: str, *, max_decimals: int | None = None) -> Decimal:
    exponent = value.adjusted() - FALLBACK_SIGNIFICANT_DIGITS + 1
    if max_decimals is not None:
        exponent = max(exponent, -max_decimals)
    return value.quantize(Decimal(1).scaleb(exponent), rounding=rounding)


def round_price(price: Decimal, side: Side, rules: MarketRules | None) -> Decimal:
    """Onto the price grid, towards the passive side: a buy never pays above its bound, a sell never
    sells below it."""
    rounding = ROUND_FLOOR if side == "buy" else ROUND_CEILING
    if rules is None:
        return _round_significant(price, rounding)
    return (price / rules.tick_size).to_integral_value(rounding=rounding) * rules.tick_size


def round_amount(amount: Decimal, rules: MarketRules | None) -> Decimal:
    """Rounded DOWN to the market's quantity decimals (never more than was sized)."""
    if amount <= 0:
        return Decimal(0)
    if rules is None:
        return _round_significant(amount, ROUND_FLOOR, max_decimals=MAX_QUANTITY_DECIMALS)
    return amount.quantize(Decimal(1).scaleb(-rules.quantity_decimals), rounding=ROUND_FLOOR)


def size_order(signal: Signal, rules: MarketRules | None, *, order_notional: Decimal, slippage_bps: Decimal,
               max_amount: Decimal | None = None) -> OrderPlan:
    """The limit IOC order for a signal; `max_amount` caps it (a sell: at most the inventory)."""
    # spread_bps < 10000 (parse_signal) and slippage_bps <= MAX_SLIPPAGE_BPS keep a sell price positive.
    bound = (signal.spread_bps / 2 + slippage_bps) / _BPS
    raw_price = signal.ref_price * (1 + bound if signal.side == "buy" else 1 - bound)
    price = round_price(raw_price, signal.side, rules)
    # Sized and valued at the worst case: a buy may pay up to its limit price, above the reference.
    worst = max(price, signal.ref_price)
    amount = order_notional / worst
    if max_amount is not None:
        amount = min(amount, max_amount)
    amount = round_amount(amount, rules)
    return OrderPlan(amount=amount, price=price, notional=amount * worst)


# -- metrics -----------------------------------------------------------------------------------------

class TradingCoreMetrics:
    """`trading_core_*`: the consumer families plus decisions, gauges and latency."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.consumer = ConsumerMetrics("trading_core", r)  # consumed (= signals), dead letters, pending, lag
        self.intents = LabelCache(Counter("trading_core_intents", "Intents emitted to orders:shadow",
                                          ["market", "side"], registry=r))
        self.rejects = LabelCache(Counter("trading_core_rejects", "Signals refused, by the first failing guard",
                                          ["guard"], registry=r))
        self.duplicates = Counter("trading_core_duplicates", "Signals skipped: their signal_id was decided before",
                                  registry=r)
        self.kill_switch = Gauge("trading_core_kill_switch", "1 while trading:kill=1", registry=r)
        self.open_intents = Gauge("trading_core_open_intents", "Fields in trading:intents:open", registry=r)
        self.decision_seconds = Histogram("trading_core_decision_seconds",
                                          "Signal handed to the core until its decision committed",
                                          buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1),
                                          registry=r)
        self.signal_age_seconds = Histogram("trading_core_signal_age_seconds",
                                            "Decision time minus the exchange time of the signal's book",
                                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                            registry=r)


# -- the loop ----------------------------------------------------------------------------------------

@dataclass
class TradingCoreSummary:
    signals: int = 0  # decided and acknowledged (duplicates included)
    intents: int = 0
    rejects: dict[str, int] = field(default_factory=dict)  # first failing guard -> count
    duplicates: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0
    handler_errors: int = 0
    dry_run: bool = True
    market_rules: str = ""
    limits: dict[str, str] = field(default_factory=dict)
    fencing_token: int = 0
    metrics_url: str = ""


@dataclass
class _Decided:
    """What a handler call decided, applied once its transaction committed."""

    entry_id: str
    market: str
    side: str
    guard: str | None  # first failing guard; None for an intent
    intent_row: dict[str, Any] | None
    event_row: dict[str, Any]
    started: float
    signal_age_s: float


class TradingCore:
    """The per-signal decision; `run_trading_core` wires it to the stream, lake and metrics."""

    def __init__(self, settings: Settings, client: redis.asyncio.Redis, *, limits: Limits, order_notional: Decimal,
                 slippage_bps: Decimal, market_rules: Mapping[str, MarketRules], metrics: TradingCoreMetrics,
                 start_id: str = "$") -> None:
        self.settings = settings
        self.client: Any = client  # redis-py's async stubs type replies as sync|async unions
        self.consumer = GroupConsumer(client, settings.signal_stream, LOOP_NAME, metrics=metrics.consumer,
                                      start_id=start_id, on_commit=lambda entry: self.committed(entry.entry_id))
        self.limits = limits
        self.order_notional = order_notional
        self.slippage_bps = slippage_bps
        self.market_rules = market_rules
        self.metrics = metrics
        self.live = not settings.dry_run
        self.pnl_key = pnl_key(settings.dry_run)  # the guards read their own mode's ledger only
        self.intents = 0
        self.rejects: Tally[str] = Tally()
        self._lake_intents = LakeWriter(settings.parquet_dir, LAKE_INTENTS)
        self._lake_events = LakeWriter(settings.parquet_dir, LAKE_EVENTS)
        self._pending: _Decided | None = None

    async def read_context(self, market: str, now: int, signal_id: str) -> tuple[bool, Context]:
        """(was the signal decided before, every input of the guards) in one pipelined round trip."""
        # MULTI/EXEC: the ledger and the open intents from one instant, never a booking half seen (its position
        # already without the sell while the sell is still open, or the reverse).
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.exists(self.consumer.done_key(signal_id))
            pipe.get(KEY_KILL)
            pipe.get(KEY_TRADING_STATE)
            pipe.hmget(self.pnl_key, pnl_fields_for(market))
            pipe.hgetall(KEY_OPEN_INTENTS)
            pipe.hget(KEY_OPEN_GAPS, market)
            pipe.hget(KEY_LAST_INTENT, market)
            if self.live:
                pipe.hgetall(KEY_GOLIVE)
            replies = await pipe.execute()
        done, kill, state, pnl, open_intents, gap, last_intent = replies[:7]
        return bool(done), context_from_redis(now_ms=now, market=market, live=self.live, kill=kill, state=state,
                                              pnl=pnl, open_intents=open_intents, gap=gap, last_intent=last_intent,
                                              golive=replies[7] if self.live else None)

    async def handle(self, entry: StreamEntry, tx: Pipeline) -> None:
        started = time.perf_counter()
        signal = parse_signal(entry.fields, self.market_rules)
        now = now_ms()
        done, context = await self.read_context(signal.market, now, signal.signal_id)
        if done:
            self.consumer.skip_duplicate()
            self.metrics.duplicates.inc()
            return
        self.metrics.kill_switch.set(1 if context.kill else 0)
        rules = self.market_rules.get(signal.market)
        reduce_only = context.state == STATE_REDUCE_ONLY
        plan = size_order(signal, rules, order_notional=self.order_notional, slippage_bps=self.slippage_bps,
                          max_amount=context.inventory(signal.market) if signal.side == "sell" else None)
        proposal = Proposal(market=signal.market, side=signal.side, amount=plan.amount, notional=plan.notional,
                            signal_ts=signal.ts,
                            min_amount=rules.min_order_base if rules else Decimal(0),
                            min_notional=rules.min_order_quote if rules else DEFAULT_MIN_ORDER_QUOTE,
                            drill=signal.strategy == DRILL_STRATEGY)
        outcomes = evaluate(proposal, context, self.limits)
        failed = first_failure(outcomes)
        intent_id = intent_id_for(signal.signal_id)
        self.consumer.mark_done(tx, signal.signal_id)
        detail: dict[str, Any] = {"signal_id": signal.signal_id, "strategy": signal.strategy,
                                  "amount": plan.amount, "price": plan.price, "notional": plan.notional,
                                  "checks": [outcome.to_json() for outcome in outcomes]}
        intent_row: dict[str, Any] | None = None
        if failed is None:
            intent = Intent(intent_id=intent_id, signal_id=signal.signal_id, market=signal.market, side=signal.side,
                            order_type="limit", time_in_force="IOC", dry_run=self.settings.dry_run, ts=now,
                            amount=plan.amount, price=plan.price, notional=plan.notional, reduce_only=reduce_only)
            encoded: dict[Any, Any] = intent.encode()  # redis-py's stubs want a dict of its value union
            tx.xadd(ORDERS_SHADOW, encoded, maxlen=self.settings.stream_maxlen, approximate=True)
            tx.hset(KEY_OPEN_INTENTS, intent_id, orjson.dumps(
                {"market": signal.market, "side": signal.side, "notional": format_decimal(plan.notional),
                 "amount": format_decimal(plan.amount), "ts": now}).decode())
            tx.hset(KEY_LAST_INTENT, signal.market, str(now))
            event_type, severity = "intent", Severity.INFO
            intent_row = intent.to_fields()
        else:
            detail.update(_failure_detail(failed))
            event_type = "kill_switch" if failed.guard == "kill_switch" else "reject"
            severity = Severity.WARNING
        queue_event(tx, event_type, severity, market=signal.market, intent_id=intent_id, detail=detail, ts=now)
        self._pending = _Decided(
            entry_id=entry.entry_id, market=signal.market, side=signal.side,
            guard=None if failed is None else failed.guard, intent_row=intent_row,
            event_row={"ts": now, "type": event_type, "severity": str(severity), "market": signal.market,
                       "intent_id": intent_id, "detail": detail},
            started=started, signal_age_s=(now - signal.ts) / 1000)

    def committed(self, entry_id: str) -> None:
        """The entry's transaction committed: count the decision and record it in the lake."""
        decided, self._pending = self._pending, None
        if decided is None or decided.entry_id != entry_id:
            return  # a duplicate: nothing was decided
        self.metrics.decision_seconds.observe(time.perf_counter() - decided.started)
        self.metrics.signal_age_seconds.observe(max(0.0, decided.signal_age_s))
        if decided.guard is None:
            self.intents += 1
            self.metrics.intents(decided.market, decided.side).inc()
        else:
            self.rejects[decided.guard] += 1
            self.metrics.rejects(decided.guard).inc()
        try:
            if decided.intent_row is not None:
                self._lake_intents.write_batch([decided.intent_row])
            self._lake_events.write_batch([decided.event_row])
        except (LakeWriteError, LakeFormatError) as exc:
            raise LakeFailure(f"{LOOP_NAME}: lake write failed after entry {entry_id} was decided (the decision "
                              f"is in Redis: orders:shadow / trading:events): {exc}") from exc

    async def refresh_gauges(self) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.get(KEY_KILL)
            pipe.hlen(KEY_OPEN_INTENTS)
            kill, open_count = await pipe.execute()
        self.metrics.kill_switch.set(1 if kill == "1" else 0)
        self.metrics.open_intents.set(int(open_count))
        await self.consumer.refresh_gauges()

    def close(self) -> None:
        self._lake_intents.close()
        self._lake_events.close()


def _failure_detail(failed: GuardOutcome) -> dict[str, Any]:
    shown = failed.to_json()
    return {"guard": failed.guard, "measured": shown["measured"], "limit": shown["limit"], "reason": failed.reason}


async def run_trading_core(settings: Settings, *, redis_url: str, duration_s: float | None = None,
                           metrics_port: int = DEFAULT_METRICS_PORT, lease_wait_s: float = 0.0,
                           limits: Limits | None = None, order_notional: Decimal | None = None,
                           slippage_bps: Decimal = DEFAULT_SLIPPAGE_BPS,
                           market_rules: Mapping[str, MarketRules] | None = None, start_id: str = "$",
                           gauge_interval_s: float = 2.0) -> TradingCoreSummary:
    """Run the trading core under the `trading-core` lease for `duration_s` (None: until cancelled).

    `market_rules` None: fetched from `settings.bitvavo_rest_url` (GET /markets, public);
    `start_id` is where a NEW consumer group starts ("$": only signals that arrive from now on).
    """
    limits = limits or Limits.from_settings(settings)
    order_notional = order_notional if order_notional is not None else settings.order_notional
    if order_notional <= 0:
        raise ConfigError([f"order_notional={order_notional}: allowed: a positive number of EUR"])
    if not 0 <= slippage_bps <= MAX_SLIPPAGE_BPS:
        raise ConfigError([f"slippage_bps={slippage_bps}: allowed: 0 to {MAX_SLIPPAGE_BPS} basis points"])
    if market_rules is None:
        market_rules, rules_source = await load_market_rules(settings.bitvavo_rest_url)
    else:
        rules_source = f"given: {len(market_rules)} markets"
    if not market_rules:
        log.warning("%s: no market rules (%s): amounts keep %d significant digits (max %d decimals), prices %d",
                    LOOP_NAME, rules_source, FALLBACK_SIGNIFICANT_DIGITS, MAX_QUANTITY_DECIMALS,
                    FALLBACK_SIGNIFICANT_DIGITS)
    metrics = TradingCoreMetrics()
    client = async_client(redis_url)
    core = TradingCore(settings, client, limits=limits, order_notional=order_notional, slippage_bps=slippage_bps,
                       market_rules=market_rules, metrics=metrics, start_id=start_id)
    consumer = core.consumer
    endpoint = MetricsEndpoint(metrics.registry, settings.metrics_host, metrics_port)

    def work(_lease: Any) -> list[Any]:
        endpoint.start()  # only once the lease is ours: a second instance fails on the lease, not the port
        log.info("%s: consuming %s (dry_run=%s, limits %s); metrics on %s", LOOP_NAME, settings.signal_stream,
                 settings.dry_run, limits.describe(), endpoint.url)
        return [consumer.run(core.handle),
                every(gauge_interval_s, core.refresh_gauges, swallow=(RedisError, OSError))]

    try:
        held = await run_guarded(LOOP_NAME, client, work, duration_s=duration_s, lease_wait_s=lease_wait_s)
    finally:
        endpoint.stop()
        core.close()
        with contextlib.suppress(RedisError, OSError):
            await client.aclose()
    stats = consumer.stats
    return TradingCoreSummary(signals=stats.consumed, intents=core.intents, rejects=dict(core.rejects),
                              duplicates=stats.duplicates, dead_lettered=stats.dead_lettered,
                              reclaimed=stats.reclaimed, handler_errors=stats.handler_errors,
                              dry_run=settings.dry_run, market_rules=rules_source, limits=limits.describe(),
                              fencing_token=held.fencing_token, metrics_url=endpoint.url)
