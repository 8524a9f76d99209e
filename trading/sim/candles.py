"""OHLCV candles (spec §4.1): one bounded series per interval, loaded with the generated history
(backfill.py) and then built from the simulator's trades.

Buckets without trades do not exist (Bitvavo omits them). Weeks start on Monday 00:00 UTC and
months on the 1st, 00:00 UTC.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from trading.decimals import format_decimal
from trading.exchange.intervals import MAX_CANDLES_PER_REQUEST, bucket_start

MAX_CANDLES = MAX_CANDLES_PER_REQUEST  # older buckets are dropped


class CandleSeries:
    """Candles of one market and interval, oldest first; each is [open, high, low, close, volume]."""

    __slots__ = ("_buckets", "interval")

    def __init__(self, interval: str) -> None:
        self.interval = interval
        self._buckets: OrderedDict[int, list[Decimal]] = OrderedDict()

    def load(self, candles: Iterable[tuple[int, list[Decimal]]]) -> None:
        """History before any trade: (bucket start, [open, high, low, close, volume]), oldest first."""
        if self._buckets:
            raise ValueError("history loads into an empty series only")
        for start, candle in candles:
            self._buckets[start] = list(candle)
            if len(self._buckets) > MAX_CANDLES:
                self._buckets.popitem(last=False)

    def add_trade(self, timestamp_ms: int, price: Decimal, amount: Decimal) -> int:
        """Fold one trade in; returns the start of the bucket it landed in."""
        start = bucket_start(timestamp_ms, self.interval)
        candle = self._buckets.get(start)
        if candle is None:
            self._buckets[start] = [price, price, price, price, amount]
            if len(self._buckets) > MAX_CANDLES:
                self._buckets.popitem(last=False)
        else:
            if price > candle[1]:
                candle[1] = price
            if price < candle[2]:
                candle[2] = price
            candle[3] = price
            candle[4] += amount
        return start

    def wire(self, start: int) -> list[Any]:
        o, h, low, c, v = self._buckets[start]
        return [start, format_decimal(o), format_decimal(h), format_decimal(low), format_decimal(c),
                format_decimal(v)]

    def query(self, limit: int, start: int | None, end: int | None) -> list[list[Any]]:
        """Newest first; `start` inclusive, `end` exclusive; the newest `limit` rows win."""
        rows: list[list[Any]] = []
        for ts in reversed(self._buckets):
            if end is not None and ts >= end:
                continue
            if start is not None and ts < start:
                break
            rows.append(self.wire(ts))
            if len(rows) >= limit:
                break
        return rows
