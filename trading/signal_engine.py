"""The signal engine loop: `bitvavo:book` -> strategy -> `SIGNAL_STREAM` and the lake channel `signals`.

One active instance (lease `signal-engine`), reading `bitvavo:book` as the consumer group
`signal-engine`. Per entry, in stream order (the pure part is `trading/signals.py`):

- Bad input (`BadBookEntry`) -> `RejectEntry` -> `bitvavo:book:dead` with the reason, counted.
- The market's rolling window is updated and the strategy asked; a signal goes to the lake
  first, then its XADD, the window (hash `signal-engine:windows`, market -> JSON) and the XACK
  commit in ONE transaction. A crash before EXEC leaves the entry pending with neither window
  nor signal written; the restarted instance reclaims it and, from the window persisted with
  the previous entry, computes the same signal with the same signal_id. A crash after the
  lake write and before EXEC leaves a lake row whose signal is written again after the
  restart: lake readers dedupe on signal_id.
- Where a new group starts: at "$", new entries only. The book stream holds hours of history
  (STREAM_MAXLEN entries) and a signal from an old book is worthless; the window fills from
  live data instead. An existing group resumes where it stopped (a restart loses nothing);
  entries older than `max_book_age_ms` (STALE_BOOK_MS) still feed the window but never make
  a signal, and a silence longer than `max_sample_gap_ms` restarts the window.
- A lake write that fails stops the loop with the error (the flow run fails); the entry stays
  pending and is processed by the next run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from trading.bus import SCHEMA_VERSION, STREAM_BOOK, encode_entry
from trading.clock import now_ms
from trading.config import MARKET_PATTERN, Settings
from trading.consumer import ConsumerMetrics, GroupConsumer, RejectEntry, StreamEntry
from trading.lake import LakeWriteError, LakeWriter
from trading.lease import Lease
from trading.log_sampling import worth_logging
from trading.loop import every, run_guarded
from trading.metrics import LabelCache, MetricsEndpoint
from trading.redis_conn import async_client
from trading.signals import BadBookEntry, Evaluation, Outcome, SignalEvaluator, SignalParams, load_strategy

log = logging.getLogger(__name__)

LOOP_NAME = "signal-engine"  # lease, consumer group and deployment
WINDOWS_KEY = "signal-engine:windows"  # hash market -> JSON MarketWindow, written with each ack
LAKE_CHANNEL = "signals"
METRICS_PREFIX = "trader_signal_engine"
DEFAULT_METRICS_PORT = 9601


class SignalEngineMetrics:
    """`trader_signal_engine_*`, plus the consumer families (`_consumed_total`, `_pending`, ...)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        p = METRICS_PREFIX
        self.consumer = ConsumerMetrics(p, r)
        self.book_entries = LabelCache(Counter(f"{p}_book_entries", "Valid book entries evaluated, by outcome",
                                               ["market", "outcome"], registry=r))
        self.signals = LabelCache(Counter(f"{p}_signals", "Signals emitted", ["market", "side"], registry=r))
        self.rejects = LabelCache(Counter(f"{p}_rejects", "Book entries refused as bad input (dead-lettered)",
                                          ["reason"], registry=r))
        self.window_resets = LabelCache(Counter(f"{p}_window_resets", "Rolling windows restarted",
                                                ["market", "reason"], registry=r))
        self.spread = LabelCache(Gauge(f"{p}_spread_bps", "Spread of the latest book entry, bps", ["market"],
                                       registry=r))
        self.volatility = LabelCache(Gauge(f"{p}_volatility_bps", "Rolling volatility of mid log returns, bps",
                                           ["market"], registry=r))
        self.processing = Histogram(f"{p}_processing_seconds", "Time to evaluate one entry and queue its writes",
                                    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
                                    registry=r)
        self.entry_age = Histogram(f"{p}_entry_age_seconds", "Local time at evaluation minus the entry's recv_ts",
                                   buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30),
                                   registry=r)


@dataclass
class SignalEngineSummary:
    strategy: str
    signal_stream: str
    params: dict[str, str]
    fencing_token: int = 0
    evaluated: int = 0  # valid entries, whatever their outcome
    signals: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    signals_by_side: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count (each one dead-lettered)
    window_resets: int = 0
    dead_lettered: int = 0  # rejects plus entries that kept failing
    reclaimed: int = 0
    handler_errors: int = 0
    markets: list[str] = field(default_factory=list)
    lake_rows: int = 0
    metrics_url: str = ""


class SignalEngine:
    """The handler and its state; `run_signal_engine` wires it to the lease, consumer and endpoint."""

    def __init__(self, settings: Settings, client: redis.asyncio.Redis, evaluator: SignalEvaluator,
                 lake: LakeWriter, metrics: SignalEngineMetrics, *, block_ms: int = 500) -> None:
        self.settings = settings
        self.client: Any = client  # redis-py's async stubs type replies as sync|async unions
        self.evaluator = evaluator
        self.lake = lake
        self.metrics = metrics
        self.consumer = GroupConsumer(client, STREAM_BOOK, LOOP_NAME, metrics=metrics.consumer, start_id="$",
                                      block_ms=block_ms)
        self.summary = SignalEngineSummary(evaluator.strategy.name, settings.signal_stream,
                                           evaluator.params.describe())
        self._uncommitted: tuple[str, Evaluation] | None = None  # the last entry's evaluation and its id

    async def load_windows(self) -> None:
        """The windows committed by the previous instance; a corrupt one is dropped (that market restarts)."""
        for market, text in (await self.client.hgetall(WINDOWS_KEY)).items():
            try:
                self.evaluator.load(market, text)
            except ValueError as exc:
                log.warning("signal engine: dropping the persisted window of %r: %s", market, exc)
        if self.evaluator.windows:
            log.info("signal engine: resumed the windows of %s", ", ".join(sorted(self.evaluator.windows)))

    async def consume(self) -> None:
        await self.load_windows()
        await self.consumer.run(self.handle)

    async def handle(self, entry: StreamEntry, tx: Pipeline) -> None:
        started = time.perf_counter()
        last, self._uncommitted = self._uncommitted, None
        if last is not None and last[0] == entry.entry_id:
            # The consumer only hands an entry back when its transaction did not commit.
            self.evaluator.restore(last[1])
        try:
            evaluation = self.evaluator.evaluate(entry.fields, now_ms())
        except BadBookEntry as exc:
            self.summary.rejected[exc.kind] = self.summary.rejected.get(exc.kind, 0) + 1
            self.metrics.rejects(exc.kind).inc()
            raise RejectEntry(str(exc)) from None
        try:
            self._queue_effects(evaluation, tx)
        except BaseException:
            self.evaluator.restore(evaluation)
            raise
        self._uncommitted = (entry.entry_id, evaluation)
        # Counted when queued: a transaction that fails and is retried counts twice (rare: Redis down).
        self._count(evaluation, entry)
        self.metrics.processing.observe(time.perf_counter() - started)

    def _queue_effects(self, evaluation: Evaluation, tx: Pipeline) -> None:
        if evaluation.outcome is Outcome.DUPLICATE:
            self.consumer.skip_duplicate()
        signal = evaluation.signal
        if signal is not None:
            self._write_lake(signal)
            fields: dict[Any, Any] = encode_entry(signal)  # redis-py wants a dict of its wider key/value union
            tx.xadd(self.settings.signal_stream, fields, maxlen=self.settings.stream_maxlen, approximate=True)
        if evaluation.window_changed:
            tx.hset(WINDOWS_KEY, evaluation.market, self.evaluator.persisted(evaluation.market))

    def _write_lake(self, signal: dict[str, Any]) -> None:
        # Before the transaction commits: a crash in between duplicates this row (same signal_id).
        try:
            self.lake.write_batch([{"v": SCHEMA_VERSION, **signal}])
        except LakeWriteError as exc:  # the consumer stops the loop on it; say why here
            log.error("signal engine: lake write failed, stopping: %s", exc)
            raise
        self.summary.lake_rows += 1

    def _count(self, evaluation: Evaluation, entry: StreamEntry) -> None:
        market, outcome, summary = evaluation.market, evaluation.outcome, self.summary
        summary.evaluated += 1
        summary.outcomes[outcome.value] = summary.outcomes.get(outcome.value, 0) + 1
        self.metrics.book_entries(market, outcome).inc()
        state = evaluation.state
        if state is not None:
            self.metrics.spread(market).set(float(state.spread_bps))
            if state.volatility_bps is not None:
                self.metrics.volatility(market).set(float(state.volatility_bps))
        if evaluation.window_reset is not None:
            summary.window_resets += 1
            self.metrics.window_resets(market, evaluation.window_reset).inc()
            if worth_logging(summary.window_resets):
                log.info("signal engine: window of %s restarted (%s)", market, evaluation.window_reset)
        recv_ts = entry.fields.get("recv_ts", "")
        if recv_ts.isdigit():
            self.metrics.entry_age.observe(max(now_ms() - int(recv_ts), 0) / 1000)
        signal = evaluation.signal
        if signal is not None:
            side = signal["side"]
            summary.signals += 1
            summary.signals_by_side[side] = summary.signals_by_side.get(side, 0) + 1
            self.metrics.signals(market, side).inc()
            if worth_logging(summary.signals):
                log.info("signal engine: signal #%d %s %s strength %s (%s)", summary.signals, market, side,
                         signal["strength"], signal["reason"])

    async def refresh_gauges(self) -> None:
        await self.consumer.refresh_gauges()

    def finish(self, lease: Lease | None) -> SignalEngineSummary:
        stats, summary = self.consumer.stats, self.summary
        summary.fencing_token = lease.fencing_token if lease else 0
        summary.dead_lettered = stats.dead_lettered
        summary.reclaimed = stats.reclaimed
        summary.handler_errors = stats.handler_errors
        summary.markets = sorted(self.evaluator.windows)
        return summary


def known_markets_check(markets: Sequence[str] | None) -> Callable[[str], bool]:
    """The market filter: the given markets, else any Bitvavo market name (ValueError for a bad one)."""
    if not markets:
        return lambda market: True
    bad = [m for m in markets if not MARKET_PATTERN.match(m)]
    if bad:
        raise ValueError(f"markets: invalid market name(s) {', '.join(bad)}; allowed: BASE-EUR such as BTC-EUR")
    allowed = frozenset(markets)
    return allowed.__contains__


async def run_signal_engine(settings: Settings, *, redis_url: str, duration_s: float | None = None,
                            metrics_port: int = DEFAULT_METRICS_PORT, lease_wait_s: float = 0.0,
                            strategy: str = "baseline", params: SignalParams | None = None,
                            markets: Sequence[str] | None = None, metrics: SignalEngineMetrics | None = None,
                            gauge_interval_s: float = 5.0, block_ms: int = 500) -> SignalEngineSummary:
    """Run the loop for `duration_s` (None: until cancelled) under the lease; returns what it did.

    `markets` restricts the accepted markets (default: INGEST_MARKETS when pinned, else any
    Bitvavo market name); an entry for another market is dead-lettered as unknown.
    """
    named = load_strategy(strategy)  # a bad name or path fails here, before anything starts
    evaluator = SignalEvaluator(named, params or SignalParams.from_settings(settings),
                                known_markets_check(markets or settings.ingest_markets))
    metrics = metrics or SignalEngineMetrics()
    client = async_client(redis_url)
    lake = LakeWriter(settings.parquet_dir, LAKE_CHANNEL)
    engine = SignalEngine(settings, client, evaluator, lake, metrics, block_ms=block_ms)

    async def serve_metrics() -> None:
        # Started under the lease, so a blocked second instance never competes for the port.
        endpoint = MetricsEndpoint(metrics.registry, settings.metrics_host, metrics_port).start()
        engine.summary.metrics_url = endpoint.url
        log.info("signal engine: strategy %s, params %s, writing %s; metrics on %s", named.name,
                 evaluator.params.describe(), settings.signal_stream, endpoint.url)
        try:
            await asyncio.Event().wait()
        finally:
            endpoint.stop()

    def work(_lease: Lease) -> list[Coroutine[Any, Any, None]]:
        return [serve_metrics(), engine.consume(),
                every(gauge_interval_s, engine.refresh_gauges, swallow=(RedisError, OSError))]

    try:
        held = await run_guarded(LOOP_NAME, client, work, duration_s=duration_s, lease_wait_s=lease_wait_s)
    finally:
        lake.close()
        await client.aclose()
    return engine.finish(held)
