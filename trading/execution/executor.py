"""The executor loop: intents from `orders:shadow` become orders on a venue, results in `orders:executed`.

One instance runs (lease `executor`); it reads `orders:shadow` as the consumer group `executor`.
The group starts at "0" when first created, so intents written before the executor's first start
are seen (and refused as too old, which clears them from `trading:intents:open`) rather than
skipped silently. Per intent, in this order:

1. decode (`Intent.decode`); off-contract → `orders:shadow:dead` with the reason;
2. idempotency on intent_id (a redelivered intent is skipped);
3. refusals, each one event, no order, `trading:intents:open` cleared, intent marked done:
   older than `max_intent_age_s` (`intent_expired`), mode differs from the venue's
   (`mode_mismatch`: a live intent never reaches the paper venue, nor the reverse), the kill
   switch read immediately before acting (`kill_switch`), and for live intents the go-live gate
   (`live_gate_closed`) and the venue's own block (`venue_blocked`, e.g. unreconciled state).
   A flatten intent (`Intent.purpose`, written by the flatten operator action) passes the kill
   switch and the gate, and only if it is a sale that cannot rest, by base amount, within its cap:
   scope `ledger`, the position of its mode's ledger (`trading:pnl:<mode>`); scope `account`
   (live only), the exchange's available balance, which the exchange enforces itself. Any other
   flatten intent is refused (`flatten_refused`); the other checks apply to it unchanged;
4. the executor's own checks (`intent_checks.check_intent`), unless the intent's order is already
   out: the market rules the venue loaded (listed and trading, order type, price and amount
   precision, minimum and maximum sizes) and the hard limits of Settings (max notional per order,
   exposure per market and in total from the mode's ledger; not for flatten sales). A violation
   never reaches the venue: `intent_refused_by_executor` event (critical: something wrote past the
   trading core), `trading:intents:open` cleared, then `orders:shadow:dead` with the reason;
5. `venue.submit(intent)`; bad input only the venue can judge comes back as `IntentError` → dead
   letter. `OrderOutcomeUnknownError` (live: the exchange cannot say whether the order exists) is
   not retried into a dead letter: the entry is done, an `order_outcome_unknown` event says so, and
   the venue keeps the intent in flight and reports its order through `poll()` once it can.
   `LeaseLostError` (live: the send claim's fence found that another instance acquired the lease;
   the venue gets the lease when the loop does) records nothing and stops the loop, as the lease
   keeper does when the fencing counter moves: the entry stays unacknowledged for the lease holder;
6. the reports, in the consumer's transaction (with the ack): XADD to `orders:executed`, the open
   paper order's last report in `KEY_PAPER_OPEN`, HDEL `orders:inflight` for live reports, an
   `order` / `order_rejected` event, the done mark (the PnL loop removes a final report's intent
   from `trading:intents:open` when it books it).

A second coroutine polls the venue every `poll_interval_s` (resting orders filling later) and
records those reports the same way, one transaction per batch. At start, paper orders a previous
instance left open are closed with a `canceled` report (they lived in that process only).

The lake channel `orders/executed` is a copy of what was committed: a third coroutine, woken by
every commit, copies the `orders:executed` entries after `KEY_LAKE_LAST_ID` into the lake, each
row with its `stream_id`, then advances that key. At start, before the first intent, the entries
a previous instance committed but did not copy are copied (the stream is never trimmed), and at
stop what is committed is copied once more. So no lake row exists whose transaction did not
commit, and none is missing for one that did; a crash between a copy and the key's update copies
those rows again at the next start (same `stream_id`; fills dedupe on `fill_id`), which the start
narrows by also reading the newest `stream_id` of the lake files of the last two hours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import orjson
import redis.asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from trading.bus import (
    KEY_INFLIGHT,
    KEY_KILL,
    KEY_LIVE_OPEN,
    KEY_OPEN_INTENTS,
    ORDERS_EXECUTED,
    ORDERS_SHADOW,
    as_text,
    flatten_authorization_key,
    pnl_key,
)
from trading.clock import now_ms
from trading.config import Settings
from trading.consumer import ConsumerMetrics, GroupConsumer, RejectEntry, StreamEntry
from trading.decimals import DecimalParseError, format_decimal, parse_decimal
from trading.events import Severity, queue_event
from trading.exchange.errors import BitvavoError
from trading.execution.intent_checks import Violation, check_intent, ledger_fields, ledger_view
from trading.execution.paper import KEY_PAPER_OPEN, PaperVenue, restart_cancellations
from trading.golive import live_gate
from trading.lake import HOUR_MS, LakeFormatError, LakeWriteError, LakeWriter, TornTail, read_jsonl
from trading.lease import Lease, LeaseLostError
from trading.log_sampling import worth_logging
from trading.loop import every, run_guarded
from trading.metrics import LabelCache, MetricsEndpoint
from trading.orders import ExecutionReport, Intent, IntentError, OrderOutcomeUnknownError, Venue
from trading.redis_conn import async_client
from trading.risk import Limits

log = logging.getLogger(__name__)

EXECUTOR = "executor"  # lease, consumer group and loop name
LAKE_CHANNEL = "orders/executed"
METRICS_PREFIX = "trader_executor"
DEFAULT_METRICS_PORT = 9603
DEFAULT_MAX_INTENT_AGE_S = 10.0
_REDIS_DOWN = (RedisError, OSError)
ABANDONED_AFTER_MS = 60_000  # beyond the intent age limit, before an open intent with no order is released
KEY_LAKE_LAST_ID = "executor:lake:last_id"  # the newest orders:executed entry copied to the lake
LAKE_PAGE = 500  # orders:executed entries per lake batch
LAKE_IDLE_S = 5.0  # the lake copy also runs this often without a commit (a missed wake-up costs no more)
LAKE_FINAL_COPY_S = 2.0  # how long the copy at stop may take; what it misses, the next start copies


def _mode(dry_run: bool) -> str:
    return "paper" if dry_run else "live"


def _stream_id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def lake_row(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """An `orders:executed` entry as its lake row: the stream fields, `v` and `ts` as ints, and the entry id."""
    return {**fields, "v": int(fields["v"]), "ts": int(fields["ts"]), "stream_id": entry_id}


def newest_lake_stream_id(lake: LakeWriter, now: int) -> str | None:
    """The newest `stream_id` in the lake files of this hour and the one before (rows are placed when copied)."""
    newest: str | None = None

    def torn(tail: TornTail) -> None:  # a copy cut short by a crash: its rows were not all written
        log.warning("executor: torn last line of %s not read", tail.path)

    for path in {lake.path_for(now - HOUR_MS), lake.path_for(now)}:
        if not Path(path).is_file():
            continue
        try:
            for row in read_jsonl(path, on_torn_tail=torn):
                stream_id = row.get("stream_id")
                if isinstance(stream_id, str) and (newest is None
                                                   or _stream_id_key(stream_id) > _stream_id_key(newest)):
                    newest = stream_id
        except (LakeFormatError, ValueError) as exc:  # an unreadable file: the checkpoint key alone decides
            log.warning("executor: lake file %s not read for its newest stream id: %s", path, exc)
    return newest


class ExecutorMetrics:
    """`trader_executor_*` (the consumer families come from `ConsumerMetrics`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.consumer = ConsumerMetrics(METRICS_PREFIX, r)
        self.intents = LabelCache(Counter("trader_executor_intents", "Intents handled (duplicates excluded)",
                                          ["mode"], registry=r))
        self.orders = LabelCache(Counter("trader_executor_orders", "Execution reports recorded, by order status",
                                         ["status", "mode"], registry=r))
        self.fills = LabelCache(Counter("trader_executor_fills", "Fills recorded", ["mode", "liquidity"],
                                        registry=r))
        # A gauge, not a counter: a single fill's fee can be negative (maker rebate, cumulative rounding).
        self.fees = LabelCache(Gauge("trader_executor_fees", "Fees of the fills recorded since start, net",
                                     ["currency", "mode"], registry=r))
        self.kill_switch_blocks = Counter("trader_executor_kill_switch_blocks",
                                          "Intents not executed because trading:kill=1", registry=r)
        self.refusals = LabelCache(Counter("trader_executor_refusals", "Intents refused before the venue, by reason",
                                           ["reason"], registry=r))
        self.submit_latency = LabelCache(Histogram(
            "trader_executor_submit_latency_seconds", "venue.submit() duration per intent", ["mode"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r))
        self.open_orders = LabelCache(Gauge("trader_executor_open_orders",
                                            "Orders whose latest recorded report is not final", ["mode"], registry=r))


@dataclass(frozen=True)
class Refusal:
    reason: str  # metrics label
    event: str
    severity: Severity
    message: str


@dataclass
class ExecutorSummary:
    mode: str
    intents: int = 0
    reports: int = 0
    fills: int = 0
    kill_switch_blocks: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    restart_cancels: int = 0
    consumed: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    reclaimed: int = 0
    fencing_token: int = 0
    metrics_url: str = ""


@runtime_checkable
class FencedVenue(Protocol):
    """A venue whose sends are fenced by the executor's lease (the live venue)."""

    def fence(self, lease: Lease) -> None: ...


class Executor:
    """The loop's state and steps; `run_executor` wires it under the lease."""

    def __init__(self, settings: Settings, client: redis.asyncio.Redis, venue: Venue, *, metrics: ExecutorMetrics,
                 lake: LakeWriter, max_intent_age_s: float = DEFAULT_MAX_INTENT_AGE_S, poll_interval_s: float = 1.0,
                 gauge_interval_s: float = 5.0) -> None:
        if max_intent_age_s <= 0 or poll_interval_s <= 0 or gauge_interval_s <= 0:
            raise ValueError("max_intent_age_s, poll_interval_s and gauge_interval_s must be positive")
        self.settings = settings
        self.limits = Limits.from_settings(settings)  # the hard limits the executor enforces itself
        self.client: Any = client  # redis-py's async stubs type replies as sync|async unions
        self.venue = venue
        self.metrics = metrics
        self.lake = lake
        self.max_intent_age_ms = int(max_intent_age_s * 1000)
        self.poll_interval_s = poll_interval_s
        self.gauge_interval_s = gauge_interval_s
        self.consumer = GroupConsumer(client, ORDERS_SHADOW, EXECUTOR, metrics=metrics.consumer, start_id="0",
                                      on_commit=lambda _entry: self._lake_due.set())
        self.summary = ExecutorSummary(mode=_mode(venue.dry_run))
        self._mode = _mode(venue.dry_run)
        self._ready = asyncio.Event()
        self._lake_due = asyncio.Event()  # something was committed to orders:executed, maybe
        self._lake_position: str | None = None  # the newest orders:executed entry in the lake
        self._open: dict[str, str] = {}  # intent_id -> mode, while its latest recorded report is not final
        # Submitted, and their transaction not known to be committed: poll reports about them wait,
        # so `orders:executed` never shows a fill before the order's first report.
        self._uncommitted: set[str] = set()
        self._poll_backlog: list[ExecutionReport] = []  # polled, not yet in Redis (Redis was down)
        self._poll_failures = 0
        self._fenced: asyncio.Future[LeaseLostError] | None = None  # set by a send the lease fence refused

    def work(self, lease: Lease) -> Sequence[Coroutine[Any, Any, None]]:
        self.summary.fencing_token = lease.fencing_token
        if isinstance(self.venue, FencedVenue):
            self.venue.fence(lease)
        self._fenced = asyncio.get_running_loop().create_future()
        return [self._consume(), self._poll_forever(), self._gauges_forever(), self._lake_forever(),
                self._stop_when_fenced(self._fenced)]

    # -- coroutines under the lease --------------------------------------------------------------

    async def _consume(self) -> None:
        copied = await self.copy_to_lake()  # what the previous instance committed and did not copy
        if copied:
            log.warning("executor: %d orders:executed entries committed by the previous instance copied to the "
                        "lake", copied)
        if isinstance(self.venue, PaperVenue):
            self.venue.hold(await self._paper_positions())
        await self.venue.start()
        await self.recover_paper_orders()
        self._ready.set()
        log.info("executor: %s venue started; consuming %s as group %s", self._mode, ORDERS_SHADOW, EXECUTOR)
        await self.consumer.run(self.handle)

    async def _stop_when_fenced(self, fenced: asyncio.Future[LeaseLostError]) -> None:
        """Raise the fence's refusal, ending the loop: the consumer would retry the entry into a dead letter."""
        raise await fenced

    async def _poll_forever(self) -> None:
        await self._ready.wait()
        while True:
            await asyncio.sleep(self.poll_interval_s)
            await self.poll_once()

    async def _gauges_forever(self) -> None:
        await self._ready.wait()
        await every(self.gauge_interval_s, self.refresh_gauges, swallow=_REDIS_DOWN)

    async def _lake_forever(self) -> None:
        """Copy what was committed to the lake after every commit; a lake that cannot be written stops the loop."""
        await self._ready.wait()
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(LAKE_IDLE_S):
                        await self._lake_due.wait()
                self._lake_due.clear()
                try:
                    await self.copy_to_lake()
                except LakeWriteError:
                    raise  # an OSError too, but no retry heals a full disk: stop loudly
                except _REDIS_DOWN as exc:
                    log.warning("executor: lake copy paused, Redis unavailable (%s); retrying", exc)
        except asyncio.CancelledError:
            # Stopping (end of segment, or another coroutine failed): copy what was committed, bounded.
            with contextlib.suppress(*_REDIS_DOWN, TimeoutError):
                async with asyncio.timeout(LAKE_FINAL_COPY_S):
                    await self.copy_to_lake()
            raise

    # -- one intent --------------------------------------------------------------------------

    async def handle(self, entry: StreamEntry, tx: Pipeline) -> None:
        try:
            intent = Intent.decode(entry.fields)
        except IntentError as exc:
            raise RejectEntry(str(exc)) from None
        # Entries are handled one at a time, each committed (or retried) before the next: earlier
        # submits are settled now, except this very intent's when its transaction is being retried.
        retried = intent.intent_id in self._uncommitted
        self._uncommitted.clear()
        consumer = self.consumer
        # One round trip: was it handled before, is its order already out, is the kill switch on.
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.exists(consumer.done_key(intent.intent_id))
            pipe.get(KEY_KILL)
            pipe.hexists(KEY_INFLIGHT, intent.intent_id)
            done, kill, inflight = await pipe.execute()
        if done:
            consumer.skip_duplicate()
            return
        mode = _mode(intent.dry_run)
        self.metrics.intents(mode).inc()
        self.summary.intents += 1
        # An order that is already out (submitted before a failed commit, or sent by an instance that died)
        # is never refused now: the venue reports what happened to it, so no fill goes unrecorded.
        already_out = retried or bool(inflight)
        refusal = None if already_out else await self._refusal(intent, kill_on=kill in ("1", b"1"))
        if refusal is not None:
            self._queue_refusal(tx, intent, refusal)
            consumer.mark_done(tx, intent.intent_id)
            return
        violation = None if already_out else await self._intent_check(intent)
        if violation is not None:
            await self._refuse_by_check(intent, violation)
            raise RejectEntry(f"refused by the executor's checks: {violation}")
        self._uncommitted.add(intent.intent_id)
        started = time.perf_counter()
        try:
            reports = await self.venue.submit(intent)
        except IntentError as exc:  # bad input only the venue can judge
            await self._forget_rejected(intent, str(exc))
            raise RejectEntry(str(exc)) from None
        except OrderOutcomeUnknownError as exc:
            # The order may exist and the exchange cannot say yet. The venue keeps the intent in flight and
            # reports its order once the exchange answers (poll), so this entry is done: retrying it could
            # only dead-letter it, and a dead letter would say the order never happened.
            self._queue_outcome_unknown(tx, intent, str(exc))
            consumer.mark_done(tx, intent.intent_id)
            return
        except LeaseLostError as exc:  # another instance holds the lease: nothing recorded, the loop stops
            self._uncommitted.discard(intent.intent_id)
            self.metrics.refusals("fenced").inc()
            self.summary.refusals["fenced"] = self.summary.refusals.get("fenced", 0) + 1
            if self._fenced is not None and not self._fenced.done():
                self._fenced.set_result(exc)
            raise
        self.metrics.submit_latency(mode).observe(time.perf_counter() - started)
        self._queue_reports(tx, reports)
        consumer.mark_done(tx, intent.intent_id)
        self._count_reports(reports)

    async def _refusal(self, intent: Intent, *, kill_on: bool) -> Refusal | None:
        age_ms = now_ms() - intent.ts
        if age_ms > self.max_intent_age_ms:
            return Refusal("expired", "intent_expired", Severity.WARNING,
                           f"intent is {age_ms} ms old; intents older than {self.max_intent_age_ms} ms are not "
                           "executed")
        if intent.dry_run != self.venue.dry_run:
            return Refusal("mode_mismatch", "mode_mismatch", Severity.CRITICAL,
                           f"{_mode(intent.dry_run)} intent refused by the {self._mode} executor (DRY_RUN differs "
                           "between the trading core and the executor)")
        flatten = intent.purpose == "flatten"
        if flatten:
            why = await self._flatten_refusal(intent)
            if why is not None:
                return Refusal("flatten_refused", "flatten_refused", Severity.CRITICAL, why)
        # Read immediately before acting (handle's pipeline): a switch flipped a moment ago stops this order.
        if kill_on and not flatten:
            return Refusal("kill_switch", "kill_switch", Severity.WARNING,
                           "trading:kill=1: order not sent")
        if not intent.dry_run:
            if not flatten:
                gate = await live_gate(self.client, now_ms())
                if not gate.open:
                    return Refusal("gate_closed", "live_gate_closed", Severity.CRITICAL, gate.reason)
            blocked = self.venue.blocked_reason()
            if blocked is not None:
                return Refusal("venue_blocked", "venue_blocked", Severity.CRITICAL, blocked)
        return None

    async def _intent_check(self, intent: Intent) -> Violation | None:
        """The executor's own market-rule and hard-limit checks (trading/execution/intent_checks.py)."""
        rules = await self.venue.market_rules.lookup(intent.market)
        best_price = None
        if rules is not None and intent.order_type == "market" and intent.amount is not None:
            best_price = await self.venue.best_price(intent.market, intent.side)
        async with self.client.pipeline(transaction=True) as tx:  # the ledger and the open sells of one instant
            tx.hmget(pnl_key(intent.dry_run), ledger_fields(intent.market))
            tx.hgetall(KEY_OPEN_INTENTS)
            values, open_intents = await tx.execute()
        ledger = ledger_view(values, now_ms(), open_intents=open_intents, market=intent.market,
                             intent_id=intent.intent_id)
        return check_intent(intent, rules, self.limits, ledger, best_price)

    async def _refuse_by_check(self, intent: Intent, violation: Violation) -> None:
        """Before the dead letter: a critical event (something wrote past the trading core), the intent released."""
        self._uncommitted.discard(intent.intent_id)
        self.metrics.refusals("intent_check").inc()
        self.summary.refusals["intent_check"] = self.summary.refusals.get("intent_check", 0) + 1
        async with self.client.pipeline(transaction=True) as tx:
            tx.hdel(KEY_OPEN_INTENTS, intent.intent_id)
            queue_event(tx, "intent_refused_by_executor", Severity.CRITICAL, market=intent.market,
                        intent_id=intent.intent_id,
                        detail={"rule": violation.rule, "reason": violation.reason, "dry_run": intent.dry_run,
                                "purpose": intent.purpose, "side": intent.side, "order_type": intent.order_type,
                                "amount": intent.amount, "amount_quote": intent.amount_quote,
                                "price": intent.price})
            await tx.execute()
        log.error("executor: intent %s refused by the executor's checks, dead-lettered: %s", intent.intent_id,
                  violation)

    def _queue_outcome_unknown(self, tx: Pipeline, intent: Intent, error: str) -> None:
        queue_event(tx, "order_outcome_unknown", Severity.WARNING, market=intent.market, intent_id=intent.intent_id,
                    detail={"reason": error, "dry_run": intent.dry_run,
                            "action": "kept in flight; reported once the exchange answers"})
        log.warning("executor: intent %s: order outcome unknown, left in flight for reconciliation: %s",
                    intent.intent_id, error)

    async def _flatten_refusal(self, intent: Intent) -> str | None:
        """Why a flatten intent may not pass the kill switch and the gate, or None (module doc, step 3)."""
        shape = intent.flatten_shape_error()
        if shape is not None:
            return shape
        assert intent.amount is not None  # flatten_shape_error checked it
        if not await self.client.exists(flatten_authorization_key(intent.intent_id)):
            return "no flatten authorization for this intent: only the flatten flow writes flatten sales"
        if intent.scope == "account":
            # The exchange refuses a sell beyond the available balance ([216]): it is the cap. Paper has no
            # account of its own beyond the paper ledger.
            return None if not intent.dry_run else "scope account is for live flatten only (paper sells its ledger)"
        key = pnl_key(intent.dry_run)
        raw = await self.client.hget(key, f"{intent.market}:position")
        try:
            position = parse_decimal(raw, "position") if raw is not None else None
        except DecimalParseError:
            position = None
        if position is None:
            return f"{key} holds no readable {intent.market} position: nothing to flatten"
        if intent.amount > position:
            return (f"sells {format_decimal(intent.amount)}, more than the {_mode(intent.dry_run)} ledger's "
                    f"{intent.market} position {format_decimal(position)}")
        return None

    def _queue_refusal(self, tx: Pipeline, intent: Intent, refusal: Refusal) -> None:
        queue_event(tx, refusal.event, refusal.severity, market=intent.market, intent_id=intent.intent_id,
                    detail={"action": "refused", "reason": refusal.message, "dry_run": intent.dry_run,
                            "side": intent.side})
        tx.hdel(KEY_OPEN_INTENTS, intent.intent_id)
        self.metrics.refusals(refusal.reason).inc()
        self.summary.refusals[refusal.reason] = self.summary.refusals.get(refusal.reason, 0) + 1
        if refusal.reason == "kill_switch":
            self.metrics.kill_switch_blocks.inc()
            self.summary.kill_switch_blocks += 1
        count = sum(self.summary.refusals.values())
        if worth_logging(count, every=100):
            log.warning("executor: intent %s refused (%s): %s (%d refusals so far)", intent.intent_id,
                        refusal.reason, refusal.message, count)

    async def _forget_rejected(self, intent: Intent, reason: str) -> None:
        """A dead-lettered intent is not open any more (the core counts open intents)."""
        self._uncommitted.discard(intent.intent_id)
        async with self.client.pipeline(transaction=True) as tx:
            tx.hdel(KEY_OPEN_INTENTS, intent.intent_id)
            queue_event(tx, "intent_rejected", Severity.WARNING, market=intent.market, intent_id=intent.intent_id,
                        detail={"reason": reason, "dry_run": intent.dry_run})
            await tx.execute()

    # -- reports -----------------------------------------------------------------------------

    async def copy_to_lake(self) -> int:
        """Copy the `orders:executed` entries after the lake's position into the lake; returns how many.

        Rows are placed in the lake file of the moment they are copied (not of their report's
        time), so a late copy never appends to an hour that compaction may have closed.
        """
        if self._lake_position is None:
            self._lake_position = await self._lake_start_position()
        copied = 0
        while True:
            entries = await self.client.xrange(ORDERS_EXECUTED, min="(" + self._lake_position, max="+",
                                               count=LAKE_PAGE)
            if not entries:
                return copied
            rows = [lake_row(as_text(entry_id), {as_text(k): as_text(v) for k, v in fields.items()})
                    for entry_id, fields in entries]
            self.lake.write_batch(rows, ts_ms=now_ms())
            self._lake_position = rows[-1]["stream_id"]
            await self.client.set(KEY_LAKE_LAST_ID, self._lake_position)
            copied += len(rows)
            if len(entries) < LAKE_PAGE:
                return copied

    async def _lake_start_position(self) -> str:
        stored = await self.client.get(KEY_LAKE_LAST_ID)
        if stored is None:
            # First start with a lake copy: executors before it wrote each report to the lake before its
            # transaction, so everything already in the stream is in the lake.
            [newest] = await self.client.xrevrange(ORDERS_EXECUTED, count=1) or [("0-0", {})]
            stored = as_text(newest[0])
            await self.client.set(KEY_LAKE_LAST_ID, stored, nx=True)
            log.info("executor: lake copy of %s starts after %s", ORDERS_EXECUTED, stored)
        in_lake = newest_lake_stream_id(self.lake, now_ms())
        if in_lake is not None and _stream_id_key(in_lake) > _stream_id_key(stored):
            return in_lake  # copied just before a crash that kept the key from advancing
        return str(stored)

    def _queue_reports(self, tx: Pipeline, reports: Sequence[ExecutionReport]) -> None:
        for report in reports:
            fields: dict[Any, Any] = report.encode()
            intent_id = report.intent_id
            # Never trimmed: the PnL ledger is rebuilt from this stream at every start, and a trimmed buy
            # under a kept sell would turn into a phantom short (docs/pnl.md). Executions are few.
            tx.xadd(ORDERS_EXECUTED, fields)
            # The open intent stays until the PnL loop books this report (it removes it in that same
            # transaction): the core counts a sell against the inventory until its fills are in the ledger.
            if report.dry_run:
                if report.final:
                    tx.hdel(KEY_PAPER_OPEN, intent_id)
                else:
                    tx.hset(KEY_PAPER_OPEN, intent_id, orjson.dumps(fields))
            else:
                tx.hdel(KEY_INFLIGHT, intent_id)  # the order is recorded: no longer merely in flight
            rejected = report.status == "rejected"
            queue_event(tx, "order_rejected" if rejected else "order",
                        Severity.WARNING if rejected else Severity.INFO, market=report.market, intent_id=intent_id,
                        detail={"status": report.status, "order_id": report.order_id, "side": report.side,
                                "filled_amount": report.filled_amount, "fee": report.fee,
                                "fee_currency": report.fee_currency, "new_fills": len(report.fills),
                                "dry_run": report.dry_run, "reason": report.reason})

    def _count_reports(self, reports: Sequence[ExecutionReport]) -> None:
        for report in reports:
            mode = _mode(report.dry_run)
            self.metrics.orders(report.status, mode).inc()
            self.summary.reports += 1
            for fill in report.fills:
                self.metrics.fills(mode, "taker" if fill.taker else "maker").inc()
                self.metrics.fees(fill.fee_currency, mode).inc(float(fill.fee))
                self.summary.fills += 1
            if report.final:
                self._open.pop(report.intent_id, None)
            else:
                self._open[report.intent_id] = mode

    async def poll_once(self) -> None:
        """Record what the venue reports about open orders; kept for the next round while Redis is down."""
        try:
            fresh = await self.venue.poll()
        except (BitvavoError, *_REDIS_DOWN) as exc:  # one bad round must not stop the loop: try next round
            self._poll_failures += 1
            if worth_logging(self._poll_failures, every=60):
                log.warning("executor: venue poll failed (%s: %s); retrying every poll", type(exc).__name__, exc)
            fresh = []
        self._poll_backlog.extend(fresh)
        if not self._poll_backlog:
            return
        try:
            waiting = {r.intent_id for r in self._poll_backlog} & self._uncommitted
            for intent_id in waiting:
                if await self.consumer.already_done(intent_id):  # its first report is committed
                    self._uncommitted.discard(intent_id)
            ready = [r for r in self._poll_backlog if r.intent_id not in self._uncommitted]
            if not ready:
                return
            async with self.client.pipeline(transaction=True) as tx:
                self._queue_reports(tx, ready)
                await tx.execute()
        except _REDIS_DOWN as exc:
            self._poll_failures += 1
            if worth_logging(self._poll_failures, every=60):
                log.warning("executor: %d polled reports not recorded yet (%s: %s); retrying every poll",
                            len(self._poll_backlog), type(exc).__name__, exc)
            return
        recorded = {id(r) for r in ready}
        self._poll_backlog = [r for r in self._poll_backlog if id(r) not in recorded]
        self._lake_due.set()
        self._count_reports(ready)

    async def _paper_positions(self) -> dict[str, Decimal]:
        """The paper ledger's positions (`trading:pnl:paper`); an unreadable one is left out, and said."""
        held: dict[str, Decimal] = {}
        for key, raw in (await self.client.hgetall(pnl_key(True))).items():
            if not key.endswith(":position"):
                continue
            market = key.removesuffix(":position")
            try:
                amount = parse_decimal(raw, key)
            except DecimalParseError:
                log.warning("executor: paper ledger %s is %r, not a decimal: the paper account holds no %s", key,
                            raw[:40], market)
                continue
            if amount > 0:
                held[market] = amount
        return held

    async def recover_paper_orders(self) -> None:
        """Paper orders lived in the previous process: close each with a final `canceled` report."""
        stored: dict[str, str] = await self.client.hgetall(KEY_PAPER_OPEN)
        if not stored:
            return
        reports, unreadable = restart_cancellations(stored, now_ms())
        async with self.client.pipeline(transaction=True) as tx:
            self._queue_reports(tx, reports)
            for intent_id in unreadable:
                tx.hdel(KEY_PAPER_OPEN, intent_id)
                tx.hdel(KEY_OPEN_INTENTS, intent_id)
                queue_event(tx, "order_lost", Severity.CRITICAL, intent_id=intent_id,
                            detail={"reason": "paper order's stored report unreadable; dropped on restart"})
            await tx.execute()
        self._lake_due.set()
        self._count_reports(reports)
        self.summary.restart_cancels = len(reports)
        log.warning("executor: %d paper orders left open by the previous instance closed as canceled (%s)",
                    len(reports) + len(unreadable), ", ".join(sorted(stored)))

    async def refresh_gauges(self) -> None:
        await self.consumer.refresh_gauges()
        await self.sweep_abandoned_intents()
        for mode in ("paper", "live"):
            self.metrics.open_orders(mode).set(sum(1 for m in self._open.values() if m == mode))

    async def sweep_abandoned_intents(self) -> None:
        """Open intents nothing will ever close (their entry was dead-lettered after repeated failures, or
        trimmed while pending, before the executor handled it): past the intent age limit, with no order
        in flight or open and no done mark, they are released, so the core's open-intent count does not
        leak until it refuses every signal."""
        cutoff = now_ms() - self.max_intent_age_ms - ABANDONED_AFTER_MS
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(KEY_OPEN_INTENTS)
            pipe.hkeys(KEY_INFLIGHT)
            pipe.hkeys(KEY_PAPER_OPEN)
            pipe.hkeys(KEY_LIVE_OPEN)
            open_intents, inflight, paper_open, live_open = await pipe.execute()
        busy = set(inflight) | set(paper_open) | set(live_open) | set(self._open) | self._uncommitted
        old = []
        for intent_id, raw in open_intents.items():
            try:
                ts = int(orjson.loads(raw)["ts"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                ts = 0  # unreadable: as old as can be
            if ts < cutoff and intent_id not in busy:
                old.append(intent_id)
        if not old:
            return
        # One the executor handled has its report in orders:executed: only the PnL loop, booking it, may
        # release it (a sell released before its booking would let its coins be sold twice).
        async with self.client.pipeline(transaction=False) as pipe:
            for intent_id in old:
                pipe.exists(self.consumer.done_key(intent_id))
            handled = await pipe.execute()
        abandoned = [intent_id for intent_id, done in zip(old, handled, strict=True) if not done]
        if not abandoned:
            return
        async with self.client.pipeline(transaction=True) as tx:
            for intent_id in abandoned:
                tx.hdel(KEY_OPEN_INTENTS, intent_id)
                queue_event(tx, "open_intent_released", Severity.WARNING, intent_id=intent_id,
                            detail={"reason": "no order in flight or open and older than the intent age limit"})
            await tx.execute()
        log.warning("executor: released %d abandoned open intents: %s", len(abandoned), ", ".join(abandoned[:5]))

    def finish(self, endpoint_url: str) -> ExecutorSummary:
        stats = self.consumer.stats
        self.summary.consumed = stats.consumed
        self.summary.dead_lettered = stats.dead_lettered
        self.summary.duplicates = stats.duplicates
        self.summary.reclaimed = stats.reclaimed
        self.summary.metrics_url = endpoint_url
        return self.summary


async def run_executor(settings: Settings, *, redis_url: str, venue: Venue, duration_s: float | None = None,
                       metrics_port: int = DEFAULT_METRICS_PORT, lease_wait_s: float = 0.0,
                       poll_interval_s: float = 1.0, max_intent_age_s: float = DEFAULT_MAX_INTENT_AGE_S,
                       gauge_interval_s: float = 5.0) -> ExecutorSummary:
    """Run the executor until `duration_s` passes (None: until cancelled); the venue is closed at the end."""
    client = async_client(redis_url)
    metrics = ExecutorMetrics()
    lake = LakeWriter(settings.parquet_dir, LAKE_CHANNEL)
    executor = Executor(settings, client, venue, metrics=metrics, lake=lake, max_intent_age_s=max_intent_age_s,
                        poll_interval_s=poll_interval_s, gauge_interval_s=gauge_interval_s)
    endpoint: MetricsEndpoint | None = None

    def work(lease: Lease) -> Sequence[Coroutine[Any, Any, None]]:
        nonlocal endpoint
        # Bound only once the lease is held: a second instance waiting for it must not take the port.
        endpoint = MetricsEndpoint(metrics.registry, settings.metrics_host, metrics_port).start()
        log.info("executor: lease held (fencing token %d); metrics on %s", lease.fencing_token, endpoint.url)
        return executor.work(lease)

    try:
        await run_guarded(EXECUTOR, client, work, duration_s=duration_s, lease_wait_s=lease_wait_s)
    finally:
        try:
            await venue.close()
        finally:
            lake.close()
            if endpoint is not None:
                endpoint.stop()
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
    return executor.finish(endpoint.url if endpoint is not None else "")
