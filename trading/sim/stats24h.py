"""Rolling 24 h ticker statistics (GET /ticker/24h, WS ticker24h) from per-minute aggregates of trades.

The generated history (backfill.py) is loaded as the first minutes, so a fresh simulator's row
summarises exactly the candles and trades it serves (open = the oldest minute's open in the
window, high/low over it, volume summed, last = the newest close), and it rolls on with the
simulated trades. A minute leaves the window once its last trade is 24 h old; with no trade in
the window the price fields are null, as on Bitvavo.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from trading.decimals import format_decimal

DAY_MS = 86_400_000
_MINUTE_MS = 60_000


class Rolling24h:
    """Per-minute aggregates of one market's trades over the last 24 h."""

    def __init__(self, quantity_decimals: int, history: Iterable[list[Any]] = ()) -> None:
        self._volume_step = Decimal(1).scaleb(-quantity_decimals)
        # [minute_start, open, high, low, close, volume, volume_quote, first_ts, last_ts], oldest first
        self._minutes: deque[list[Any]] = deque(list(minute) for minute in history)
        self._last: Decimal | None = self._minutes[-1][4] if self._minutes else None

    def add_trade(self, timestamp_ms: int, price: Decimal, amount: Decimal) -> None:
        self._last = price
        minute = timestamp_ms - timestamp_ms % _MINUTE_MS
        if self._minutes and self._minutes[-1][0] == minute:
            bucket = self._minutes[-1]
            bucket[2] = max(bucket[2], price)
            bucket[3] = min(bucket[3], price)
            bucket[4] = price
            bucket[5] += amount
            bucket[6] += amount * price
            bucket[8] = timestamp_ms
        else:
            self._minutes.append([minute, price, price, price, price, amount, amount * price,
                                  timestamp_ms, timestamp_ms])

    @property
    def last_price(self) -> Decimal | None:
        """The newest trade's price, even when it is older than 24 h (GET /ticker/price)."""
        return self._last

    def row(self, market: str, now_ms: int, bid: tuple[Decimal, Decimal] | None,
            ask: tuple[Decimal, Decimal] | None) -> dict[str, Any]:
        cutoff = now_ms - DAY_MS
        while self._minutes and self._minutes[0][8] < cutoff:
            self._minutes.popleft()
        highs = [m[2] for m in self._minutes]
        lows = [m[3] for m in self._minutes]
        volume = sum((m[5] for m in self._minutes), Decimal(0))
        volume_quote = sum((m[6] for m in self._minutes), Decimal(0))
        if self._minutes:
            first, newest = self._minutes[0], self._minutes[-1]
            open_, open_ts, last, close_ts = first[1], first[7], newest[4], newest[8]
        else:
            open_, open_ts, last, close_ts = None, None, None, None
        return {
            "market": market,
            "startTimestamp": cutoff,
            "timestamp": now_ms,
            "open": _fmt(open_),
            "openTimestamp": open_ts,
            "high": _fmt(max(highs)) if highs else None,
            "low": _fmt(min(lows)) if lows else None,
            "last": _fmt(last),
            "closeTimestamp": close_ts,
            "bid": _fmt(bid[0]) if bid else None,
            "bidSize": _fmt(bid[1]) if bid else None,
            "ask": _fmt(ask[0]) if ask else None,
            "askSize": _fmt(ask[1]) if ask else None,
            "volume": format_decimal(volume.quantize(self._volume_step)),
            "volumeQuote": format_decimal(volume_quote.quantize(Decimal("0.01"))),
        }


def _fmt(value: Decimal | None) -> str | None:
    return None if value is None else format_decimal(value)
