"""The loop every ingest channel shares: lease, socket, universe, batching into lake then Redis.

A channel is an `IngestHandler` (ticker24h, order book, candles). `run_ingest` owns everything
around it:
- a Redis lease (`lease:ingest:<name>`) so two instances never ingest the same channel; it gates
  the runner's Redis clients as `trading.loop.run_guarded` does (a Redis restart pauses the
  writes to Redis until the lease is re-acquired; the socket is read on into the lake until the
  sink's high-water mark holds it);
- the market selection and a universe watcher that subscribes/unsubscribes without a restart;
- one `BitvavoWebSocket` whose events go straight to the handler (the hot path: no Prefect,
  no logging per message);
- an `IngestSink` flushed every `flush_interval_s` (sooner when rows pile up): the lake first (a
  disk error stops the loop loudly), then the Redis streams, written in the background while the
  socket is read on (a Redis outage is counted and survived: the lake has it);
- the `ingest_*` metrics endpoint on 127.0.0.1;
- an optional `duration_s` after which it stops cleanly (tests, demos, bounded segments);
- stopping on a cancel as every loop does (`trading.loop`: `run_together`, the lease released
  with a bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from redis.exceptions import RedisError

from trading.bus import StreamPublisher, encoded_entry
from trading.clock import now_ms
from trading.config import Settings
from trading.exchange.governor import RateGovernor, budget_identity, shared_governor
from trading.exchange.ws import BitvavoWebSocket
from trading.gaps import GapKind, GapLedger, GapRecord
from trading.ingest.markets import UniverseWatcher, select_markets
from trading.lake import LakeWriter
from trading.lease import RedisLease
from trading.loop import lease_client, release, run_together
from trading.metrics import IngestMetrics
from trading.redis_conn import async_client, command_gate, share_gate

log = logging.getLogger(__name__)

INGEST_LEASE_TTL_MS = 15_000


class IngestSink:
    """Rows encoded as they are emitted, per lake channel and stream; `flush()` writes the lake,
    then releases the stream entries to the publisher's background writer.

    Nothing in here waits for Redis: the socket reader goes on reading while a batch is in
    flight. `backpressure()` is the reader's flow control, called after every event: from
    `flush_rows` pending rows on it asks the flush loop for a flush (and yields once so that it
    runs); while `high_water` released entries still wait for Redis it makes the reader wait
    until half of them are written, so a feed faster than Redis slows the reader down instead
    of growing memory without bound. Entries reach Redis in emit order per stream.
    """

    def __init__(self, lake_root: Path, publisher: StreamPublisher, *, fsync: bool = False,
                 flush_rows: int = 1_000, high_water: int = 20_000) -> None:
        self._lake_root = lake_root
        self._publisher = publisher
        self._fsync = fsync
        self._writers: dict[str, LakeWriter] = {}
        self.rows_written = 0
        self.streams: set[str] = set()
        self.flush_rows = flush_rows
        self.high_water = high_water
        self._pending_rows = 0
        self._flush_due = asyncio.Event()

    def emit(self, lake_channel: str, row: Mapping[str, Any], stream: str | None = None) -> None:
        """One row for the lake channel and, when given, the stream. It is encoded for both now: a
        row either form cannot carry raises here, and then neither has it."""
        if stream is None:
            self._writer(lake_channel).add_row(row)
        else:
            entry = encoded_entry(row)
            self._writer(lake_channel).add_row(row)
            self._publisher.add_encoded(stream, entry)
            self.streams.add(stream)
        self._pending_rows += 1

    def emit_encoded(self, lake_channel: str, ts_ms: int, line: bytes, stream: str, entry: bytes) -> None:
        """One row already encoded: its lake line (placed by `ts_ms`) and its stream entry, exactly as
        `emit` would encode them (see `LakeWriter.add_line`, `StreamPublisher.add_encoded`)."""
        writer = self._writers.get(lake_channel) or self._writer(lake_channel)
        writer.add_line(ts_ms, line)
        self._publisher.add_encoded(stream, entry)
        self.streams.add(stream)
        self._pending_rows += 1

    def backpressure(self) -> Awaitable[None] | None:
        if self._pending_rows < self.flush_rows:
            return None
        if self._publisher.unsent >= self.high_water:
            self._flush_due.set()
            return self._publisher.wait_unsent_below(self.high_water // 2)
        if self._flush_due.is_set():
            return None  # asked already: the flush loop runs at the reader's next yield
        self._flush_due.set()
        return asyncio.sleep(0)  # yield once: the flush loop runs before the reader goes on

    async def wait_flush_due(self, interval_s: float) -> None:
        """Until `interval_s` has passed or the reader asked for a flush, whichever comes first."""
        due = self._flush_due
        if not due.is_set():
            timer = asyncio.get_running_loop().call_later(interval_s, due.set)
            try:
                await due.wait()
            finally:
                timer.cancel()
        due.clear()

    def flush(self) -> None:
        """Write every pending row to the lake, then release the stream entries, so Redis never
        holds an entry the lake does not: a disk error raises here and drops the entries."""
        self._pending_rows = 0
        try:
            for writer in self._writers.values():
                self.rows_written += writer.flush()
        except BaseException:
            self._publisher.drop_pending()
            raise
        self._publisher.release()

    def _writer(self, channel: str) -> LakeWriter:
        writer = self._writers.get(channel)
        if writer is None:
            writer = self._writers[channel] = LakeWriter(self._lake_root, channel, fsync=self._fsync)
        return writer

    def close(self) -> None:
        """Flush, then close every lake file (all of them, even when the flush failed)."""
        try:
            self.flush()
        finally:
            writers, self._writers = list(self._writers.values()), {}
            with contextlib.ExitStack() as closing:
                for writer in writers:
                    closing.callback(writer.close)


@dataclass
class IngestContext:
    """What a handler may use; given to it once the loop is set up."""

    settings: Settings
    ws: BitvavoWebSocket
    sink: IngestSink
    ledger: GapLedger
    metrics: IngestMetrics
    governor: RateGovernor


class IngestHandler(Protocol):
    name: str  # lease, metrics and log name: "ticker24h", "orderbook", "candles"

    @property
    def last_message_ms(self) -> Mapping[str, int]:
        """market -> local receive time (ms) of its latest message."""

    def attach(self, context: IngestContext) -> None: ...

    async def set_markets(self, added: tuple[str, ...], removed: tuple[str, ...]) -> None:
        """Subscribe `added`, unsubscribe `removed` (the socket may not be connected yet)."""

    def on_event(self, frame: dict[str, Any]) -> None:
        """One stream event from the socket (hot path)."""

    async def on_connect(self) -> None:
        """The socket (re)connected, before it resubscribes: record the outage."""

    def on_disconnect(self) -> None:
        """The socket dropped: invalidate state that is only true while connected."""

    async def tick(self) -> None:
        """Called after every flush: periodic work (snapshots, backfills)."""

    async def close(self) -> None:
        """The loop is stopping: cancel background work (snapshot fetches, backfills)."""

    def summary(self) -> Mapping[str, Any]: ...


class HandlerBase:
    """What every handler shares: the context it is attached to, per-market freshness, no-op hooks."""

    def __init__(self) -> None:
        self._context: IngestContext | None = None
        self.last_message_ms: dict[str, int] = {}

    @property
    def context(self) -> IngestContext:
        assert self._context is not None, "attach() first"
        return self._context

    def attach(self, context: IngestContext) -> None:
        self._context = context

    def on_disconnect(self) -> None:
        return None

    async def tick(self) -> None:
        return None

    async def close(self) -> None:
        return None


@dataclass
class IngestSummary:
    name: str
    markets: tuple[str, ...]
    market_source: str
    rows_written: int
    stream_entries: int
    stream_batches_failed: int
    reconnects: int
    malformed_frames: int
    fencing_token: int
    handler: dict[str, Any] = field(default_factory=dict)


async def refresh_gauges(client: Any, sink: IngestSink, handler: IngestHandler, metrics: IngestMetrics) -> None:
    """Slow-moving gauges, refreshed every few seconds rather than per message."""
    for stream in sink.streams:
        metrics.stream_length(stream).set(await client.xlen(stream))
    now = now_ms()
    for market, seen in handler.last_message_ms.items():
        metrics.last_message_age(handler.name, market).set((now - seen) / 1000)


def record_reconnect_window(ws: BitvavoWebSocket, ledger: GapLedger, metrics: IngestMetrics, channel: str,
                            markets: tuple[str, ...]) -> None:
    """After a reconnect, the time the socket was down is a known hole in every market's data."""
    down_since = ws.stats.disconnected_at_ms
    if not down_since:
        return
    ledger.record(GapRecord(GapKind.RECONNECT, channel, down_since, now_ms(), market=None,
                            detail={"reason": ws.stats.last_error, "markets": list(markets)}))
    metrics.reconnects(channel).inc()
    for market in markets:
        metrics.gaps(channel, market, "reconnect").inc()


async def run_ingest(handler: IngestHandler, settings: Settings, *, redis_url: str, duration_s: float | None = None,
                     metrics_port: int = 0, lease_wait_s: float = 0.0, universe_poll_s: float = 10.0,
                     flush_interval_s: float = 0.05, ws_silence_timeout_s: float = 30.0,
                     gauge_interval_s: float = 5.0) -> IngestSummary:
    client = async_client(redis_url)
    gate = command_gate(client)
    assert gate is not None  # made by async_client
    async with lease_client(client, INGEST_LEASE_TTL_MS) as own:
        lease = RedisLease(own, f"ingest:{handler.name}", ttl_ms=INGEST_LEASE_TTL_MS)
        try:
            held = await lease.acquire(wait_s=lease_wait_s)
            log.info("ingest %s: lease acquired (fencing token %d)", handler.name, held.fencing_token)
            selection = await select_markets(settings, client)
            metrics = IngestMetrics()
            publisher = StreamPublisher(redis_url, maxlen=settings.stream_maxlen)
            # Its stream writes pause with the runner's (bus.py keeps the client private; nothing was sent on it yet).
            share_gate(publisher._client, gate)
            sink = IngestSink(settings.parquet_dir, publisher)
            ledger = GapLedger(settings.parquet_dir)
            governor = shared_governor(budget_identity(settings.bitvavo_rest_url))  # ingest calls are unsigned
            # Set before the first scrape: an unset headroom gauge reads 0 and would page RateLimitHeadroomLow.
            metrics.rate_limit_remaining.set(governor.state().remaining)
            endpoint = metrics.endpoint(settings.metrics_host, metrics_port).start()
            ws = BitvavoWebSocket(settings.bitvavo_ws_url, on_event=handler.on_event, on_connect=handler.on_connect,
                                  on_disconnect=handler.on_disconnect, flow_control=sink.backpressure,
                                  governor=governor,
                                  silence_timeout_s=ws_silence_timeout_s,
                                  on_error_frame=lambda frame: log.warning("ingest %s: error frame %s", handler.name,
                                                                           frame))
            handler.attach(IngestContext(settings, ws, sink, ledger, metrics, governor))
            await handler.set_markets(selection.markets, ())
            watcher = UniverseWatcher(settings, client, selection)
            log.info("ingest %s: %d markets from %s; metrics on %s", handler.name, len(selection.markets),
                     selection.source, endpoint.url)

            malformed_seen = 0

            async def flush_forever() -> None:
                nonlocal malformed_seen
                while True:
                    await sink.wait_flush_due(flush_interval_s)
                    sink.flush()
                    if ws.stats.malformed_frames != malformed_seen:  # frames that were not even JSON objects
                        metrics.parse_errors("frame").inc(ws.stats.malformed_frames - malformed_seen)
                        malformed_seen = ws.stats.malformed_frames
                    metrics.redis_up.set(1 if publisher.redis_up else 0)
                    metrics.rate_limit_remaining.set(governor.state().remaining)
                    await handler.tick()

            async def refresh_gauges_forever() -> None:
                while True:
                    await asyncio.sleep(gauge_interval_s)
                    with contextlib.suppress(RedisError):  # Redis down: the publisher already reports it
                        await refresh_gauges(client, sink, handler, metrics)

            async def follow_universe() -> None:
                while True:
                    await asyncio.sleep(universe_poll_s)
                    change = await watcher.poll()
                    if change:
                        log.info("ingest %s: universe change +%s -%s", handler.name, list(change.added),
                                 list(change.removed))
                        await handler.set_markets(change.added, change.removed)

            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(duration_s):
                        await run_together([ws.run(), lease.keep_renewed(gate=gate), flush_forever(), follow_universe(),
                                            refresh_gauges_forever()])
            finally:
                await handler.close()
                await ws.close()
                try:
                    sink.close()  # the last rows: lake, then their stream entries
                finally:
                    ledger.close()
                    await publisher.aclose()
                    endpoint.stop()
            return IngestSummary(handler.name, watcher.current.markets, watcher.current.source, sink.rows_written,
                                 publisher.stats.entries_written, publisher.stats.batches_failed, ws.stats.reconnects,
                                 ws.stats.malformed_frames, (lease.latest or held).fencing_token,
                                 dict(handler.summary()))
        finally:
            await release(lease)
            gate.open_until(math.inf)
            await client.aclose()
