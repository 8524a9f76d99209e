"""Candle ingest: live candles from the socket, a REST backfill of what it missed, empty buckets in the ledger.

Streams `bitvavo:candles:<interval>` and lake channels `candles/<interval>` get one entry per
candle update, with exactly the contract fields: v, ts, recv_ts, market, interval, open_ts,
open, high, low, close, volume. Socket candles keep their decimal strings as received; REST
candles pass through `Candle` and are written as Bitvavo's minimal strings (the REST form).
`ts` is `open_ts`: candle frames carry no event time, and the bucket start is the one exchange
time a candle has, the same whichever way it arrived.

Bitvavo re-sends the current bucket after every trade, so one bucket has several entries; the
last is its final state. Backfilled candles are older than live ones already published, so
consumers keep the newest entry per (market, interval, open_ts) rather than trusting stream order.

Backfill. Per market and interval (a `CandleSeries`), `settled_until` is a bucket start before
which every bucket is emitted, recorded as known empty, or was watched whole by the socket;
`live_since` is the first bucket the current subscription sees whole (a candle frame carries the
whole bucket so far, so any bucket that starts after the subscription is complete on the socket).
The range [settled_until, live_since) is owed and fetched over REST once its buckets are closed:
- at start, settled_until is `backfill_buckets` before the current bucket;
- after a reconnect, a caught-up series goes back to the newest candle it emitted (trades may
  have changed that bucket while the socket was down);
- the bucket the socket came up in is fetched again once it closes, unless the socket sends it.
A bucket is closed once it ended `settle_s` ago: the open bucket is never fetched nor called empty.
Each closed bucket of a fetched range that Bitvavo omits (it omits buckets without trades) is a
`candle_known_empty` ledger record, consecutive buckets merged; ranges the ledger already knows
empty are not requested again, so restarts do not re-fetch the same empty hours.

One backfill request is in flight at a time, in a worker thread (the REST client is blocking and
books its weight in the shared governor); `tick()` starts it and applies its reply on the event
loop, and starts nothing while the minute's budget is within `budget_reserve` of the governor's
own headroom, so backfills never starve order book resyncs or orders.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trading.backoff import Backoff
from trading.bus import SCHEMA_VERSION, stream_candles
from trading.clock import now_ms
from trading.decimals import format_decimal
from trading.exchange.errors import BitvavoError
from trading.exchange.governor import RateBudgetExhaustedError
from trading.exchange.intervals import FIXED_INTERVAL_MS, MAX_CANDLES_PER_REQUEST
from trading.exchange.models import Candle, CandleEvent, PayloadError
from trading.exchange.rest import BitvavoRest
from trading.gaps import GapKind, GapRecord, covers
from trading.ingest.runner import HandlerBase, IngestContext, record_reconnect_window

log = logging.getLogger(__name__)

CHANNEL = "candles"  # WebSocket channel, metrics label, and the lake channels' prefix
EVENT = "candle"
INTERVAL_MS = FIXED_INTERVAL_MS  # bucket arithmetic needs a fixed size: 1W and 1M are not supported
# The subscription takes effect a round trip after on_connect: a bucket starting within this
# margin might miss its first trades on the socket, so it counts as not seen whole.
SUBSCRIBE_MARGIN_MS = 2_000

TimeRange = tuple[int, int]  # [start_ts, end_ts) in exchange ms


def lake_channel(interval: str) -> str:
    return f"{CHANNEL}/{interval}"


def bucket_start(ts_ms: int, interval_ms: int) -> int:
    return ts_ms - ts_ms % interval_ms


def uncovered_span(start_ts: int, end_ts: int, interval_ms: int, known_empty: list[TimeRange]) -> TimeRange | None:
    """The smallest bucket range holding every bucket of [start_ts, end_ts) not known to be empty.

    One request for the whole span costs less than one per hole between known-empty stretches.
    """
    first, last_end = start_ts, end_ts
    while first < last_end and covers(known_empty, first, first + interval_ms):
        first += interval_ms
    while last_end > first and covers(known_empty, last_end - interval_ms, last_end):
        last_end -= interval_ms
    return (first, last_end) if first < last_end else None


def empty_runs(start_ts: int, end_ts: int, interval_ms: int, present: Collection[int],
               known_empty: list[TimeRange]) -> list[TimeRange]:
    """Buckets of [start_ts, end_ts) with no candle and not yet known empty, consecutive ones merged."""
    runs: list[TimeRange] = []
    for bucket in range(start_ts, end_ts, interval_ms):
        if bucket in present or covers(known_empty, bucket, bucket + interval_ms):
            continue
        if runs and runs[-1][1] == bucket:
            runs[-1] = (runs[-1][0], bucket + interval_ms)
        else:
            runs.append((bucket, bucket + interval_ms))
    return runs


def request_windows(start_ts: int, end_ts: int, interval_ms: int,
                    max_buckets: int = MAX_CANDLES_PER_REQUEST) -> list[TimeRange]:
    """[start_ts, end_ts) cut into requests of at most `max_buckets` buckets each."""
    step = interval_ms * max_buckets
    return [(start, min(start + step, end_ts)) for start in range(start_ts, end_ts, step)]


@dataclass
class CandleSeries:
    """Backfill state of one market and interval; times are bucket starts in exchange ms."""

    settled_until: int
    live_since: int | None = None  # None until the series is subscribed on a connected socket
    last_candle: Candle | None = None  # the newest candle emitted
    retry_at_ms: int = 0
    backoff: Backoff = field(default_factory=lambda: Backoff(base_s=5.0, cap_s=300.0))

    @property
    def caught_up(self) -> bool:
        return self.live_since is not None and self.settled_until >= self.live_since

    def owed(self, closed_end: int) -> TimeRange | None:
        """The range to fetch now: owed buckets that closed before `closed_end`."""
        if self.live_since is None:
            return None
        end = min(self.live_since, closed_end)
        return (self.settled_until, end) if self.settled_until < end else None


@dataclass(frozen=True)
class BackfillJob:
    market: str
    interval: str
    start_ts: int
    end_ts: int


@dataclass(frozen=True)
class BackfillReply:
    job: BackfillJob
    known_empty: list[TimeRange]  # the ledger's known-empty stretches of the job's range
    span: TimeRange | None  # what was requested; None when the ledger already covered everything
    candles: list[Candle]
    rest_calls: int


class CandlesIngest(HandlerBase):
    name = "candles"

    def __init__(self, intervals: Iterable[str] = ("1m", "5m"), backfill_buckets: int = 60, *,
                 settle_s: float = 5.0, budget_reserve: int = 100, clock_ms: Callable[[], int] = now_ms) -> None:
        """`backfill_buckets`: how far back the start backfill reaches, per interval. `settle_s`: how long after
        its end a bucket is trusted closed on REST. `budget_reserve`: weight left unused by backfills beyond the
        governor's critical headroom. `clock_ms`: the exchange's time for bucket arithmetic (tests move it ahead).
        """
        super().__init__()
        self.intervals = tuple(intervals)
        unsupported = [interval for interval in self.intervals if interval not in INTERVAL_MS]
        if not self.intervals or unsupported:
            raise ValueError(f"candle intervals must be some of {', '.join(INTERVAL_MS)}; got {self.intervals}")
        if backfill_buckets < 0:
            raise ValueError(f"backfill_buckets must be >= 0, got {backfill_buckets}")
        self.backfill_buckets = backfill_buckets
        self.settle_ms = int(settle_s * 1000)
        self.budget_reserve = budget_reserve
        self._clock_ms = clock_ms
        self._streams = {interval: stream_candles(interval) for interval in self.intervals}
        self._lake_channels = {interval: lake_channel(interval) for interval in self.intervals}
        self.series: dict[tuple[str, str], CandleSeries] = {}
        self._rest: BitvavoRest | None = None
        self._inflight: tuple[BackfillJob, asyncio.Task[BackfillReply]] | None = None
        self.events = 0
        self.backfilled = 0
        self.known_empty_buckets = 0
        self.rejected = 0
        self.rest_calls = 0
        self.backfill_errors = 0

    @property
    def markets(self) -> tuple[str, ...]:
        return tuple(sorted({market for market, _ in self.series}))

    def attach(self, context: IngestContext) -> None:
        super().attach(context)
        # No client retries: a failed backfill is retried by this handler with its own backoff,
        # and retry sleeps would keep the worker thread (and a shutdown) waiting.
        self._rest = BitvavoRest(context.settings.bitvavo_rest_url, governor=context.governor, max_retries=0)

    def _live_since(self, now: int, interval_ms: int) -> int:
        return bucket_start(now + SUBSCRIBE_MARGIN_MS, interval_ms) + interval_ms

    async def set_markets(self, added: tuple[str, ...], removed: tuple[str, ...]) -> None:
        ws = self.context.ws
        now = self._clock_ms()
        for market in added:
            for interval in self.intervals:
                size = INTERVAL_MS[interval]
                self.series.setdefault((market, interval), CandleSeries(
                    settled_until=bucket_start(now, size) - self.backfill_buckets * size,
                    live_since=self._live_since(now, size) if ws.connected else None))
        for interval in self.intervals:
            if added:
                await ws.subscribe(CHANNEL, added, interval=interval)
            if removed:
                await ws.unsubscribe(CHANNEL, removed, interval=interval)
        for market in removed:
            self.last_message_ms.pop(market, None)
            for interval in self.intervals:
                self.series.pop((market, interval), None)

    def on_event(self, frame: dict[str, Any]) -> None:
        if frame.get("event") != EVENT:
            return
        metrics = self.context.metrics
        try:
            event = CandleEvent.from_wire(frame)
        except PayloadError as exc:
            self.rejected += 1
            metrics.parse_errors(CHANNEL).inc()
            log.debug("rejected candle event: %s", exc)
            return
        series = self.series.get((event.market, event.interval))
        if series is None:
            return
        recv_ts = now_ms()
        size = INTERVAL_MS[event.interval]
        for raw, candle in zip(frame["candle"], event.candles, strict=True):
            self._emit(series, event.market, event.interval, candle, [str(value) for value in raw[1:]], recv_ts)
            # The bucket the socket came up in, sent by the socket: whole, so no follow-up fetch.
            if series.live_since is not None and candle.open_ts == series.live_since - size:
                series.live_since = candle.open_ts
            self.events += 1
        metrics.messages(CHANNEL, event.market).inc()
        self.last_message_ms[event.market] = recv_ts

    async def on_connect(self) -> None:
        context = self.context
        for interval in self.intervals:
            record_reconnect_window(context.ws, context.ledger, context.metrics, self._lake_channels[interval],
                                    self.markets)
        now = self._clock_ms()
        for (_market, interval), series in self.series.items():
            if series.caught_up and series.last_candle is not None:
                series.settled_until = max(series.settled_until, series.last_candle.open_ts)
            series.live_since = self._live_since(now, INTERVAL_MS[interval])

    async def close(self) -> None:
        # The REST call runs in a worker thread that cannot be interrupted; dropping its task means
        # its reply is never applied (results are applied only in tick()). The thread ends at the
        # client's timeout at the latest.
        if self._inflight is not None:
            self._inflight[1].cancel()
            self._inflight = None

    async def tick(self) -> None:
        if self._inflight is not None:
            running, task = self._inflight
            if not task.done():
                return
            self._inflight = None
            self._finish(running, task)
        if not self._budget_allows():
            return
        job = self.plan_backfill()
        if job is not None:
            self._inflight = (job, asyncio.create_task(asyncio.to_thread(self.fetch_backfill, job)))

    def summary(self) -> Mapping[str, Any]:
        return {"events": self.events, "backfilled": self.backfilled, "known_empty_buckets": self.known_empty_buckets,
                "rejected": self.rejected, "rest_calls": self.rest_calls, "backfill_errors": self.backfill_errors}

    # backfill ----------------------------------------------------------------------------------

    def _budget_allows(self) -> bool:
        governor = self.context.governor
        state = governor.state()
        return state.banned_until_ms <= now_ms() and state.remaining > governor.critical_headroom + self.budget_reserve

    def plan_backfill(self) -> BackfillJob | None:
        """The next owed range whose buckets have all closed, if any."""
        now = self._clock_ms()
        for (market, interval), series in self.series.items():
            if series.retry_at_ms > now:
                continue
            size = INTERVAL_MS[interval]
            owed = series.owed(bucket_start(now - self.settle_ms, size))
            if owed is not None:
                return BackfillJob(market, interval, *owed)
        return None

    def fetch_backfill(self, job: BackfillJob) -> BackfillReply:
        """Blocking (worker thread): read the ledger, then request what it does not know to be empty."""
        assert self._rest is not None, "attach() first"
        size = INTERVAL_MS[job.interval]
        known = self.context.ledger.known_empty(self._lake_channels[job.interval], job.market, job.start_ts,
                                                job.end_ts)
        span = uncovered_span(job.start_ts, job.end_ts, size, known)
        windows = request_windows(*span, size) if span is not None else []
        candles: list[Candle] = []
        for start, end in windows:
            candles.extend(self._rest.candles(job.market, job.interval, limit=(end - start) // size, start_ms=start,
                                              end_ms=end))
        return BackfillReply(job, known, span, candles, len(windows))

    def _finish(self, job: BackfillJob, task: asyncio.Task[BackfillReply]) -> None:
        try:
            reply = task.result()
        except (BitvavoError, PayloadError, RateBudgetExhaustedError) as exc:
            self.backfill_errors += 1
            series = self.series.get((job.market, job.interval))
            if series is None:
                return
            delay_s = series.backoff.next_delay()
            series.retry_at_ms = self._clock_ms() + int(delay_s * 1000)
            log.warning("candle backfill of %s/%s [%d, %d) failed, retrying in %.0f s: %s", job.market,
                        job.interval, job.start_ts, job.end_ts, delay_s, exc)
            return
        self.apply_backfill(reply)

    def apply_backfill(self, reply: BackfillReply) -> None:
        """Emit the fetched candles, record the closed buckets Bitvavo omitted, move the watermark."""
        job = reply.job
        series = self.series.get((job.market, job.interval))
        if series is None:
            return  # the market left the universe while the request was out
        size = INTERVAL_MS[job.interval]
        recv_ts = now_ms()
        present: set[int] = set()
        emitted = 0
        for candle in sorted(reply.candles, key=lambda c: c.open_ts):
            present.add(candle.open_ts)
            if candle == series.last_candle:
                continue  # already published exactly so (the socket, or an earlier backfill)
            prices = [format_decimal(value) for value in (candle.open, candle.high, candle.low, candle.close,
                                                          candle.volume)]
            self._emit(series, job.market, job.interval, candle, prices, recv_ts)
            emitted += 1
        runs = empty_runs(*reply.span, size, present, reply.known_empty) if reply.span is not None else []
        if runs:
            channel = self._lake_channels[job.interval]
            self.context.ledger.record([GapRecord(GapKind.CANDLE_KNOWN_EMPTY, channel, start, end, market=job.market)
                                        for start, end in runs])
            self.context.metrics.gaps(channel, job.market, GapKind.CANDLE_KNOWN_EMPTY.value).inc(len(runs))
        empty_buckets = sum((end - start) // size for start, end in runs)
        series.settled_until = max(series.settled_until, job.end_ts)
        series.backoff.reset()
        self.backfilled += emitted
        self.known_empty_buckets += empty_buckets
        self.rest_calls += reply.rest_calls
        log.info("backfilled %d candles (%d known-empty buckets) for %s/%s in %d requests", emitted, empty_buckets,
                 job.market, job.interval, reply.rest_calls)

    def _emit(self, series: CandleSeries, market: str, interval: str, candle: Candle, prices: list[str],
              recv_ts: int) -> None:
        open_, high, low, close, volume = prices
        row: dict[str, Any] = {"v": SCHEMA_VERSION, "ts": candle.open_ts, "recv_ts": recv_ts, "market": market,
                               "interval": interval, "open_ts": candle.open_ts, "open": open_, "high": high,
                               "low": low, "close": close, "volume": volume}
        self.context.sink.emit(self._lake_channels[interval], row, self._streams[interval])
        if series.last_candle is None or candle.open_ts >= series.last_candle.open_ts:
            series.last_candle = candle
