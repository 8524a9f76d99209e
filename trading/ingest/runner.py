"""The loop every ingest channel shares: lease, socket, universe, batching into lake then Redis.

A channel is an `IngestHandler` (ticker24h, order book, candles). `run_ingest` owns everything
around it:
- a Redis lease (`lease:ingest:<name>`) so two instances never ingest the same channel;
- the market selection and a universe watcher that subscribes/unsubscribes without a restart;
- one `BitvavoWebSocket` whose events go straight to the handler (the hot path: no Prefect,
  no logging per message);
- an `IngestSink` flushed every `flush_interval_s`: the lake first (a disk error stops the loop
  loudly), then the Redis streams (a Redis outage is counted and survived: the lake has it);
- the `ingest_*` metrics endpoint on 127.0.0.1;
- an optional `duration_s` after which it stops cleanly (tests, demos, bounded segments).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from redis.exceptions import RedisError

from trading.bus import StreamPublisher
from trading.clock import now_ms
from trading.config import Settings
from trading.exchange.governor import RateGovernor, budget_identity, shared_governor
from trading.exchange.ws import BitvavoWebSocket
from trading.gaps import GapKind, GapLedger, GapRecord
from trading.ingest.markets import UniverseWatcher, select_markets
from trading.lake import LakeWriter
from trading.lease import RedisLease
from trading.metrics import IngestMetrics
from trading.redis_conn import async_client

log = logging.getLogger(__name__)


class IngestSink:
    """Rows buffered per lake channel (and stream); `flush()` writes the lake, then Redis.

    `backpressure()` is the socket reader's flow control: above `high_water` pending rows it
    returns a flush for the reader to await, so a feed faster than Redis slows the reader down
    instead of growing memory without bound. Flushes are serialised to keep stream order.
    """

    def __init__(self, lake_root: Path, publisher: StreamPublisher, *, fsync: bool = False,
                 high_water: int = 5_000) -> None:
        self._lake_root = lake_root
        self._publisher = publisher
        self._fsync = fsync
        self._writers: dict[str, LakeWriter] = {}
        self._rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._entries: list[tuple[str, dict[str, Any]]] = []
        self.rows_written = 0
        self.streams: set[str] = set()
        self.high_water = high_water
        self._pending_rows = 0
        self._flush_lock = asyncio.Lock()

    def emit(self, lake_channel: str, row: dict[str, Any], stream: str | None = None) -> None:
        self._pending_rows += 1
        self._rows[lake_channel].append(row)
        if stream is not None:
            self._entries.append((stream, row))
            self.streams.add(stream)

    def backpressure(self) -> Awaitable[None] | None:
        return self.flush() if self._pending_rows >= self.high_water else None

    async def flush(self) -> None:
        async with self._flush_lock:
            rows, self._rows = self._rows, defaultdict(list)
            entries, self._entries = self._entries, []
            self._pending_rows = 0
            for channel, batch in rows.items():
                writer = self._writers.get(channel)
                if writer is None:
                    writer = self._writers[channel] = LakeWriter(self._lake_root, channel, fsync=self._fsync)
                self.rows_written += writer.write_batch(batch)
            publish = self._publisher.publish
            for stream, row in entries:
                await publish(stream, row)
            await self._publisher.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


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
    lease = RedisLease(client, f"ingest:{handler.name}")
    try:
        held = await lease.acquire(wait_s=lease_wait_s)
        log.info("ingest %s: lease acquired (fencing token %d)", handler.name, held.fencing_token)
        selection = await select_markets(settings, client)
        metrics = IngestMetrics()
        endpoint = metrics.endpoint(settings.metrics_host, metrics_port).start()
        publisher = StreamPublisher(redis_url, maxlen=settings.stream_maxlen)
        sink = IngestSink(settings.parquet_dir, publisher)
        ledger = GapLedger(settings.parquet_dir)
        governor = shared_governor(budget_identity(settings.bitvavo_rest_url))  # ingest calls are unsigned
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
                await asyncio.sleep(flush_interval_s)
                await sink.flush()
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
                async with asyncio.timeout(duration_s), asyncio.TaskGroup() as tasks:
                    tasks.create_task(ws.run())
                    tasks.create_task(lease.keep_renewed())
                    tasks.create_task(flush_forever())
                    tasks.create_task(follow_universe())
                    tasks.create_task(refresh_gauges_forever())
        except BaseExceptionGroup as group:
            # One failure (disk full, lost lease) is the story; unwrap it for a clear error.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            await handler.close()
            await ws.close()
            try:
                await sink.flush()
            finally:
                sink.close()
                ledger.close()
                await publisher.aclose()
                endpoint.stop()
        return IngestSummary(handler.name, watcher.current.markets, watcher.current.source, sink.rows_written,
                             publisher.stats.entries_written, publisher.stats.batches_failed, ws.stats.reconnects,
                             ws.stats.malformed_frames, held.fencing_token, dict(handler.summary()))
    finally:
        with contextlib.suppress(Exception):
            await lease.release()
        await client.aclose()
