"""Bounded public trade history of one market (GET /{market}/trades)."""

from __future__ import annotations

from collections import deque
from typing import Any

from trading.decimals import format_decimal
from trading.matching import Trade


def trade_wire(trade: Trade) -> dict[str, Any]:
    return {"id": trade.trade_id, "timestamp": trade.timestamp, "amount": format_decimal(trade.amount),
            "price": format_decimal(trade.price), "side": trade.side}


class TradeHistory:
    def __init__(self, maxlen: int) -> None:
        self._trades: deque[Trade] = deque(maxlen=maxlen)

    def append(self, trade: Trade) -> None:
        self._trades.append(trade)

    def query(self, *, limit: int, start: int | None = None, end: int | None = None,
              id_from: str | None = None, id_to: str | None = None) -> list[dict[str, Any]]:
        """Newest first. `start` inclusive, `end` exclusive (ms); `id_from`..`id_to` inclusive."""
        rows: list[dict[str, Any]] = []
        reached_to = id_to is None
        for trade in reversed(self._trades):
            if not reached_to:
                if trade.trade_id != id_to:
                    continue
                reached_to = True
            if start is not None and trade.timestamp < start:
                break
            if end is None or trade.timestamp < end:
                rows.append(trade_wire(trade))
                if len(rows) >= limit:
                    break
            if trade.trade_id == id_from:
                break
        return rows
