"""ticker24h ingest: each row of each `ticker24h` event to `bitvavo:ticker24h` and the lake.

Rows are validated by the `Ticker24h` model (finite decimal strings or null) and written with
the strings as received; a malformed row is counted and skipped, the rest of the frame is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from trading.bus import SCHEMA_VERSION, STREAM_TICKER24H
from trading.clock import now_ms
from trading.exchange.models import PayloadError, Ticker24h
from trading.ingest.runner import HandlerBase, record_reconnect_window

log = logging.getLogger(__name__)

CHANNEL = "ticker24h"
FIELDS = ("open", "high", "low", "last", "volume", "volumeQuote", "bid", "bidSize", "ask", "askSize")


class Ticker24hIngest(HandlerBase):
    name = "ticker24h"

    def __init__(self) -> None:
        super().__init__()
        self._markets: set[str] = set()
        self.rows = 0
        self.rejected = 0

    async def set_markets(self, added: tuple[str, ...], removed: tuple[str, ...]) -> None:
        self._markets.update(added)
        self._markets.difference_update(removed)
        for market in removed:
            self.last_message_ms.pop(market, None)
        if added:
            await self.context.ws.subscribe(CHANNEL, added)
        if removed:
            await self.context.ws.unsubscribe(CHANNEL, removed)

    def on_event(self, frame: dict[str, Any]) -> None:
        if frame.get("event") != CHANNEL:
            return
        metrics, sink = self.context.metrics, self.context.sink
        rows = frame.get("data")
        if not isinstance(rows, list):
            self.rejected += 1
            metrics.parse_errors(CHANNEL).inc()
            return
        recv_ts = now_ms()
        for raw in rows:
            try:
                ticker = Ticker24h.from_wire(raw)
            except PayloadError as exc:
                self.rejected += 1
                metrics.parse_errors(CHANNEL).inc()
                log.debug("rejected ticker24h row: %s", exc)
                continue
            if ticker.market not in self._markets:
                continue
            ts = ticker.timestamps.get("timestamp", recv_ts)
            row: dict[str, Any] = {"v": SCHEMA_VERSION, "ts": ts, "recv_ts": recv_ts, "market": ticker.market}
            for name in FIELDS:
                if raw.get(name) is not None:
                    row[name] = raw[name]
            sink.emit(CHANNEL, row, STREAM_TICKER24H)
            self.last_message_ms[ticker.market] = recv_ts
            metrics.messages(CHANNEL, ticker.market).inc()
            metrics.lag(CHANNEL).observe(max(recv_ts - ts, 0) / 1000)
            self.rows += 1

    async def on_connect(self) -> None:
        record_reconnect_window(self.context.ws, self.context.ledger, self.context.metrics, CHANNEL,
                                tuple(sorted(self._markets)))

    def summary(self) -> Mapping[str, Any]:
        return {"rows": self.rows, "rejected": self.rejected}
