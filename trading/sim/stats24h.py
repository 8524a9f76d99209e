"""Rolling 24 h ticker statistics (GET /ticker/24h, WS ticker24h) from the simulator's trades.

A fresh simulator has no history, so each market starts with a synthetic baseline standing for the
24 h before start: open/high/low around the starting price and the market's real daily volume.
The baseline's volume fades out linearly over the first 24 h of running (its high/low/open count
until then), so the numbers look plausible at once and become fully simulated after a day.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from trading.decimals import format_decimal

DAY_MS = 86_400_000
_MINUTE_MS = 60_000


@dataclass(frozen=True)
class Baseline:
    open: Decimal
    high: Decimal
    low: Decimal
    last: Decimal
    volume: Decimal
    volume_quote: Decimal
    created_ms: int  # simulator start: the baseline covers [created - 24 h, created)


def synthetic_baseline(rng: random.Random, price: Decimal, tick: Decimal, volume_quote: Decimal,
                       quantity_decimals: int, now_ms: int) -> Baseline:
    def on_tick(value: float) -> Decimal:
        return max(tick, (Decimal(repr(value)) / tick).to_integral_value(ROUND_HALF_UP) * tick)

    change = rng.gauss(0.0, 0.02)
    open_ = on_tick(float(price) * (1 - change))
    high = max(open_, price, on_tick(float(max(open_, price)) * (1 + abs(rng.gauss(0.0, 0.01)))))
    low = min(open_, price, on_tick(float(min(open_, price)) * (1 - abs(rng.gauss(0.0, 0.01)))))
    vq = (volume_quote * Decimal(repr(rng.uniform(0.8, 1.2)))).quantize(Decimal("0.01"))
    volume = (vq / ((high + low) / 2)).quantize(Decimal(1).scaleb(-quantity_decimals))
    return Baseline(open_, high, low, price, volume, vq, now_ms)


class Rolling24h:
    """Per-minute aggregates of one market's trades over the last 24 h, plus the fading baseline."""

    def __init__(self, baseline: Baseline, quantity_decimals: int) -> None:
        self.baseline = baseline
        self._volume_step = Decimal(1).scaleb(-quantity_decimals)
        # [minute_start, open, high, low, close, volume, volume_quote, first_ts, last_ts]
        self._minutes: deque[list[Any]] = deque()

    def add_trade(self, timestamp_ms: int, price: Decimal, amount: Decimal) -> None:
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
    def last_price(self) -> Decimal:
        return self._minutes[-1][4] if self._minutes else self.baseline.last

    def row(self, market: str, now_ms: int, bid: tuple[Decimal, Decimal] | None,
            ask: tuple[Decimal, Decimal] | None) -> dict[str, Any]:
        cutoff = now_ms - DAY_MS
        while self._minutes and self._minutes[0][8] < cutoff:
            self._minutes.popleft()
        base = self.baseline
        weight = max(Decimal(0), 1 - Decimal(now_ms - base.created_ms) / DAY_MS)
        highs = [m[2] for m in self._minutes]
        lows = [m[3] for m in self._minutes]
        volume = sum((m[5] for m in self._minutes), Decimal(0))
        volume_quote = sum((m[6] for m in self._minutes), Decimal(0))
        if weight > 0:
            highs.append(base.high)
            lows.append(base.low)
            volume += base.volume * weight
            volume_quote += base.volume_quote * weight
            open_, open_ts = base.open, cutoff
        elif self._minutes:
            open_, open_ts = self._minutes[0][1], self._minutes[0][7]
        else:
            open_, open_ts = None, None
        if self._minutes:
            last, close_ts = self._minutes[-1][4], self._minutes[-1][8]
        elif weight > 0:
            last, close_ts = base.last, base.created_ms
        else:
            last, close_ts = None, None
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
