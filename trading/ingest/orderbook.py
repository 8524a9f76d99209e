"""Order book ingest: every applied update, the top of book after it, and snapshots.

Streams: `bitvavo:orderbook:update` (market, nonce, bids, asks as received) and `bitvavo:book`
(market, nonce, bid, bid_size, ask, ask_size after the update). Lake: `orderbook/update`,
`orderbook/top`, `orderbook/snapshot` (on start, after every resync and reconnect, and every
`snapshot_every_s`). The gap ledger gets every nonce gap, the resync that healed it, and every
reconnect window.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from trading.book import BookSync, Gap
from trading.bus import SCHEMA_VERSION, STREAM_BOOK, STREAM_ORDERBOOK_UPDATE
from trading.clock import now_ms
from trading.decimals import format_decimal
from trading.exchange.live_book import LiveBooks
from trading.exchange.models import BookSnapshot, Level
from trading.gaps import GapKind, GapRecord
from trading.ingest.book_rows import BookRowEncoder
from trading.ingest.runner import HandlerBase, IngestContext, record_reconnect_window

log = logging.getLogger(__name__)

UPDATE_CHANNEL = "orderbook/update"
TOP_CHANNEL = "orderbook/top"
SNAPSHOT_CHANNEL = "orderbook/snapshot"


def _levels(levels: list[Level]) -> list[list[str]]:
    return [[format_decimal(p), format_decimal(s)] for p, s in levels]


class OrderbookIngest(HandlerBase):
    name = "orderbook"

    def __init__(self, snapshot_every_s: float = 300.0) -> None:
        super().__init__()
        self.snapshot_every_ms = int(snapshot_every_s * 1000)
        self.books = LiveBooks([], on_applied=self._on_applied, on_gap=self._on_gap, on_snapshot=self._on_snapshot)
        self._last_ts: dict[str, int] = {}
        self._open_gaps: dict[str, tuple[int, Gap]] = {}
        self._last_periodic_ms = now_ms()
        self._parse_errors_seen = 0
        self._message_counts: dict[str, int] = {}
        self._encoders: dict[str, BookRowEncoder] = {}
        self._lag_sample_ms: int | None = None

    def attach(self, context: IngestContext) -> None:
        super().attach(context)
        self.books.attach(context.ws)

    @property
    def markets(self) -> tuple[str, ...]:
        return tuple(sorted(self.books.syncs))

    async def set_markets(self, added: tuple[str, ...], removed: tuple[str, ...]) -> None:
        ws = self.context.ws
        for market in added:
            self.books.add_market(market)
        if added:
            await ws.subscribe("book", added)
        if removed:
            await ws.unsubscribe("book", removed)
        for market in removed:
            self.books.remove_market(market)
            self._open_gaps.pop(market, None)
            self._encoders.pop(market, None)
            self.last_message_ms.pop(market, None)

    def on_event(self, frame: dict[str, Any]) -> None:
        if frame.get("event") != "book":
            return
        market = frame.get("market")
        if isinstance(market, str) and market in self.books.syncs:
            self._message_counts[market] = self._message_counts.get(market, 0) + 1
            self.last_message_ms[market] = now_ms()
        self.books.on_book_event(frame)

    async def on_connect(self) -> None:
        record_reconnect_window(self.context.ws, self.context.ledger, self.context.metrics, UPDATE_CHANNEL,
                                self.markets)

    def on_disconnect(self) -> None:
        self.books.reset_all()

    async def close(self) -> None:
        self.books.reset_all()  # cancels snapshot fetches in flight

    async def tick(self) -> None:
        # Prometheus per flush, not per message: counts add up, lag is the latest sample.
        metrics = self.context.metrics
        for market, count in self._message_counts.items():
            metrics.messages("book", market).inc(count)
        self._message_counts.clear()
        if self._lag_sample_ms is not None:
            metrics.lag("book").observe(max(self._lag_sample_ms, 0) / 1000)
            self._lag_sample_ms = None
        if self.books.stats.parse_errors != self._parse_errors_seen:
            metrics.parse_errors("book").inc(self.books.stats.parse_errors - self._parse_errors_seen)
            self._parse_errors_seen = self.books.stats.parse_errors
        now = now_ms()
        if now - self._last_periodic_ms < self.snapshot_every_ms:
            return
        self._last_periodic_ms = now
        for sync in self.books.syncs.values():
            if sync.is_live:
                self._emit_snapshot(sync.market, sync.book.nonce, sync.book.bids(), sync.book.asks(), now, "periodic")

    def summary(self) -> Mapping[str, Any]:
        stats = self.books.stats
        return {"applied": stats.applied, "resyncs": self.books.resyncs, "snapshots": stats.snapshots,
                "parse_errors": stats.parse_errors, "unknown_market": stats.unknown_market}

    # LiveBooks callbacks -----------------------------------------------------------------------

    def _on_applied(self, sync: BookSync, frame: dict[str, Any], bid: Level | None, ask: Level | None) -> None:
        recv_ts = now_ms()
        timestamp = frame.get("timestamp")
        ts = timestamp // 1_000_000 if type(timestamp) is int else recv_ts
        market, nonce = sync.market, frame["nonce"]
        self._last_ts[market] = ts
        self._lag_sample_ms = recv_ts - ts
        encoder = self._encoders.get(market)
        if encoder is None:
            encoder = self._encoders[market] = BookRowEncoder(market)
        # The book applied these, so they are lists of [price, size] strings (or absent).
        line, entry = encoder.update(ts, recv_ts, nonce, frame.get("bids") or [], frame.get("asks") or [])
        emit = self.context.sink.emit_encoded
        emit(UPDATE_CHANNEL, recv_ts, line, STREAM_ORDERBOOK_UPDATE, entry)
        line, entry = encoder.top(ts, recv_ts, nonce, bid, ask)
        emit(TOP_CHANNEL, recv_ts, line, STREAM_BOOK, entry)

    def _on_gap(self, gap: Gap) -> None:
        now = now_ms()
        market = gap.market
        self._open_gaps[market] = (now, gap)
        self.context.ledger.record(GapRecord(
            GapKind.NONCE_GAP, UPDATE_CHANNEL, min(self._last_ts.get(market, now), now), now, market=market,
            detail={"expected_nonce": gap.expected_nonce, "received_nonce": gap.received_nonce}))
        self.context.metrics.gaps(UPDATE_CHANNEL, market, "nonce_gap").inc()
        self.context.metrics.resyncs(market).inc()

    def _on_snapshot(self, sync: BookSync, snapshot: BookSnapshot) -> None:
        now = now_ms()
        ts = snapshot.timestamp_ns // 1_000_000 if snapshot.timestamp_ns else now
        opened = self._open_gaps.pop(sync.market, None)
        reason = "resync" if opened else "start"
        if opened is not None:
            started, gap = opened
            self.context.ledger.record(GapRecord(
                GapKind.RESYNC, UPDATE_CHANNEL, started, max(now, started), market=sync.market,
                detail={"expected_nonce": gap.expected_nonce, "snapshot_nonce": snapshot.nonce}))
            self.context.metrics.gaps(UPDATE_CHANNEL, sync.market, "resync").inc()
        self._emit_snapshot(sync.market, snapshot.nonce, snapshot.bids, snapshot.asks, ts, reason)
        log.info("book %s live at nonce %d (%s)", sync.market, sync.book.nonce, reason)

    def _emit_snapshot(self, market: str, nonce: int, bids: list[Level], asks: list[Level], ts: int,
                       reason: str) -> None:
        self.context.sink.emit(SNAPSHOT_CHANNEL, {"v": SCHEMA_VERSION, "ts": ts, "recv_ts": now_ms(), "market": market,
                                                  "nonce": nonce, "bids": _levels(bids), "asks": _levels(asks),
                                                  "reason": reason})
