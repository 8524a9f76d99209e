"""OHLCV candles built from the simulator's trades (spec §4.1): one bounded series per interval.

Buckets without trades do not exist (Bitvavo omits them). Weeks start on Monday 00:00 UTC and
months on the 1st, 00:00 UTC.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from trading.decimals import format_decimal

_MINUTE = 60_000
_FIXED_MS = {
    "1m": _MINUTE, "5m": 5 * _MINUTE, "15m": 15 * _MINUTE, "30m": 30 * _MINUTE,
    "1h": 60 * _MINUTE, "2h": 120 * _MINUTE, "4h": 240 * _MINUTE, "6h": 360 * _MINUTE,
    "8h": 480 * _MINUTE, "12h": 720 * _MINUTE, "1d": 1440 * _MINUTE,
}
_WEEK_MS = 7 * 1440 * _MINUTE
_MONDAY_OFFSET_MS = 4 * 1440 * _MINUTE  # 1970-01-01 was a Thursday; 1970-01-05 a Monday
INTERVALS: tuple[str, ...] = (*_FIXED_MS, "1W", "1M")
MAX_CANDLES = 1440  # the endpoint's maximum `limit`; older buckets are dropped


def bucket_start(timestamp_ms: int, interval: str) -> int:
    size = _FIXED_MS.get(interval)
    if size is not None:
        return timestamp_ms - timestamp_ms % size
    if interval == "1W":
        shifted = timestamp_ms - _MONDAY_OFFSET_MS
        return shifted - shifted % _WEEK_MS + _MONDAY_OFFSET_MS
    if interval == "1M":
        moment = datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)
        return int(datetime(moment.year, moment.month, 1, tzinfo=UTC).timestamp() * 1000)
    raise ValueError(f"unknown interval {interval!r}")


class CandleSeries:
    """Candles of one market and interval, oldest first; each is [open, high, low, close, volume]."""

    __slots__ = ("_buckets", "interval")

    def __init__(self, interval: str) -> None:
        self.interval = interval
        self._buckets: OrderedDict[int, list[Decimal]] = OrderedDict()

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
