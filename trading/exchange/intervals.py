"""Bitvavo candle intervals (spec §4.1) and their bucket boundaries, in UTC ms."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

_MINUTE_MS = 60_000
# Intervals of fixed length; 1W (weeks start Monday 00:00 UTC) and 1M (calendar months) are not.
FIXED_INTERVAL_MS: Mapping[str, int] = {
    "1m": _MINUTE_MS, "5m": 5 * _MINUTE_MS, "15m": 15 * _MINUTE_MS, "30m": 30 * _MINUTE_MS,
    "1h": 60 * _MINUTE_MS, "2h": 120 * _MINUTE_MS, "4h": 240 * _MINUTE_MS, "6h": 360 * _MINUTE_MS,
    "8h": 480 * _MINUTE_MS, "12h": 720 * _MINUTE_MS, "1d": 1440 * _MINUTE_MS,
}
CANDLE_INTERVALS: tuple[str, ...] = (*FIXED_INTERVAL_MS, "1W", "1M")
MAX_CANDLES_PER_REQUEST = 1440  # the candles endpoint's maximum `limit`
_WEEK_MS = 7 * 1440 * _MINUTE_MS
_MONDAY_OFFSET_MS = 4 * 1440 * _MINUTE_MS  # 1970-01-01 was a Thursday; 1970-01-05 a Monday


def bucket_start(timestamp_ms: int, interval: str) -> int:
    """Start (UTC ms) of the `interval` bucket holding `timestamp_ms`."""
    size = FIXED_INTERVAL_MS.get(interval)
    if size is not None:
        return timestamp_ms - timestamp_ms % size
    if interval == "1W":
        shifted = timestamp_ms - _MONDAY_OFFSET_MS
        return shifted - shifted % _WEEK_MS + _MONDAY_OFFSET_MS
    if interval == "1M":
        moment = datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)
        return int(datetime(moment.year, moment.month, 1, tzinfo=UTC).timestamp() * 1000)
    raise ValueError(f"unknown interval {interval!r}")
