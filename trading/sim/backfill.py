"""The market's past before the simulator started: what a fresh simulator serves from its first request.

Per market, `backfill(spec, seed, start_ms)` generates:

* **one-minute bars** for the 1440 minutes (24 h; fewer when asked) ending with the one holding
  `start_ms - 1` (the newest may be partial): a seeded random walk of the price with calm/volatile regimes, drawn
  directly as candles, never traded through the matching engine (that would cost seconds);
* **candles of every interval** Bitvavo serves, exact aggregates of those bars (1W and 1M of the
  1d candles, whose buckets they contain);
* **public trades** for the newest `TRADE_MINUTES` minutes only, which reproduce those bars exactly
  (first trade at the open, last at the close, the high and the low traded in between, amounts
  summing to the volume); older minutes exist only as candles and 24 h aggregates.

Contract: the newest bar closes at the market's starting best bid, the price the live generator
starts from, so history and live trading join without a jump. Nothing is stamped at or after
`start_ms`. Every bar has a volume of at least one lot (Bitvavo omits empty buckets, and these
markets trade every minute). Prices lie on the tick grid, at least one tick; amounts are whole
lots. The daily quote volume is the catalog's 24 h volume ±20 %. The result depends only on
(seed, market, start_ms): the walk draws from `random.Random(f"{seed}:{market}:backfill")`.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from trading.exchange.intervals import CANDLE_INTERVALS, FIXED_INTERVAL_MS, bucket_start
from trading.matching import Side, Trade
from trading.sim.markets import MarketSpec

HISTORY_MINUTES = 1440  # 24 h: enough for ticker24h and for any selection window of 1m/5m candles
TRADE_MINUTES = 60  # individual trades only for the newest hour (bounded start-up cost and memory)
MAX_TRADES_PER_MINUTE = 20
_MINUTE_MS = 60_000
# Relative σ of the price per minute; about what the live generator's steps add up to in a minute.
_CALM_SIGMA = 0.0007
_VOLATILE_SIGMA = 0.0025
_LEAVE_CALM = 1 / 60  # per minute: calm spells last about an hour, volatile ones about 10 minutes
_LEAVE_VOLATILE = 1 / 10
_VOLATILE_VOLUME = 3.0  # volatile minutes trade this many times more


@dataclass(frozen=True, slots=True)
class Bar:
    """One bucket in integer ticks and lots; `first_ts`/`last_ts` bound its trades (ms)."""

    start: int
    open: int
    high: int
    low: int
    close: int
    volume: int
    first_ts: int
    last_ts: int


@dataclass(frozen=True)
class Backfill:
    """A market's generated past: bars per candle interval and trades, oldest first."""

    spec: MarketSpec
    bars: Mapping[str, list[Bar]]  # "1m" is the walk itself; the others are folded from it
    trades: tuple[Trade, ...]
    volume_quote: tuple[Decimal, ...]  # per one-minute bar: Σ amount × price (exact where trades exist)

    def candles(self, interval: str) -> list[tuple[int, list[Decimal]]]:
        """(bucket start, [open, high, low, close, volume]) per bucket, oldest first."""
        tick, places = self.spec.tick, -self.spec.quantity_decimals
        return [(bar.start, [Decimal(bar.open) * tick, Decimal(bar.high) * tick, Decimal(bar.low) * tick,
                             Decimal(bar.close) * tick, Decimal(bar.volume).scaleb(places)])
                for bar in self.bars[interval]]

    def minute_rows(self) -> list[list[Any]]:
        """Rolling24h's per-minute aggregates: [start, open, high, low, close, volume, volume_quote, first, last]."""
        return [[start, *candle, vq, bar.first_ts, bar.last_ts]
                for (start, candle), bar, vq in zip(self.candles("1m"), self.bars["1m"], self.volume_quote,
                                                    strict=True)]


def fold_intervals(minutes: list[Bar]) -> dict[str, list[Bar]]:
    """Bars of every interval, each folded from the coarsest finer interval whose buckets it is made of."""
    bars = {"1m": minutes}
    for interval in CANDLE_INTERVALS[1:]:
        size = FIXED_INTERVAL_MS.get(interval)
        if size is None:  # weeks and months start at midnight UTC, so each holds whole days
            finer = "1d"
        else:
            finer = max((name for name, ms in FIXED_INTERVAL_MS.items() if ms < size and size % ms == 0),
                        key=FIXED_INTERVAL_MS.__getitem__)
        bars[interval] = _aggregate(bars[finer], interval)
    return bars


def _aggregate(bars: Iterable[Bar], interval: str) -> list[Bar]:
    groups: list[list[Bar]] = []
    starts: list[int] = []
    for bar in bars:
        start = bucket_start(bar.start, interval)
        if not starts or start != starts[-1]:
            groups.append([])
            starts.append(start)
        groups[-1].append(bar)
    return [Bar(start, group[0].open, max(b.high for b in group), min(b.low for b in group),
                group[-1].close, sum(b.volume for b in group), group[0].first_ts, group[-1].last_ts)
            for start, group in zip(starts, groups, strict=True)]


def backfill(spec: MarketSpec, seed: int, start_ms: int, minutes: int = HISTORY_MINUTES) -> Backfill:
    """`minutes` (0..HISTORY_MINUTES) shortens the past; 0 gives none (a market that never traded)."""
    if not 0 <= minutes <= HISTORY_MINUTES:
        raise ValueError(f"history minutes must be within 0..{HISTORY_MINUTES}, got {minutes}")
    rng = random.Random(f"{seed}:{spec.market}:backfill")
    tick = float(spec.tick)
    lot = 10.0 ** -spec.quantity_decimals
    newest = bucket_start(start_ms - 1, "1m")
    starts = [newest - (minutes - 1 - i) * _MINUTE_MS for i in range(minutes)]

    # The walk: log returns drawn forward in time, then anchored so the newest close is the start price.
    returns: list[float] = []
    sigmas: list[float] = []
    volatile = False
    for _ in starts:
        if rng.random() < (_LEAVE_VOLATILE if volatile else _LEAVE_CALM):
            volatile = not volatile
        sigma = _VOLATILE_SIGMA if volatile else _CALM_SIGMA
        sigmas.append(sigma)
        returns.append(rng.gauss(0.0, sigma))
    log_close = [0.0] * minutes
    level = math.log(float(spec.best_bid))
    for i in range(minutes - 1, -1, -1):
        log_close[i] = level
        level -= returns[i]
    first_open = level

    def ticks(log_price: float) -> int:
        return max(1, round(math.exp(log_price) / tick))

    period_quote = float(spec.volume_quote_24h) * rng.uniform(0.8, 1.2) * minutes / HISTORY_MINUTES
    weights = [rng.lognormvariate(0.0, 0.8) * (_VOLATILE_VOLUME if s == _VOLATILE_SIGMA else 1.0) for s in sigmas]
    total_weight = sum(weights) or 1.0
    typical_trade = max(12.0, float(spec.volume_quote_24h) / 86_400)
    ids = random.Random(f"{seed}:{spec.market}:backfill-ids")

    bars: list[Bar] = []
    trades: list[Trade] = []
    volume_quote: list[Decimal] = []
    previous_close = ticks(first_open)
    for i, start in enumerate(starts):
        open_ = previous_close
        close = int(spec.best_bid / spec.tick) if i == minutes - 1 else ticks(log_close[i])
        reference = max(open_, close)
        high = max(open_, close) + round(abs(rng.gauss(0.0, sigmas[i] / 2)) * reference)
        low = max(1, min(open_, close) - round(abs(rng.gauss(0.0, sigmas[i] / 2)) * reference))
        quote = period_quote * weights[i] / total_weight
        lots = max(1, int(quote / ((open_ + close) / 2 * tick) / lot))
        end = min(start + _MINUTE_MS, start_ms)  # the newest minute may be cut by the start
        if i >= minutes - TRADE_MINUTES:
            count = min(MAX_TRADES_PER_MINUTE, max(4, round(quote / typical_trade)))
            lots = max(lots, count)
            minute_trades = _trades(rng, ids, spec, start, end, (open_, high, low, close), lots, count)
            trades.extend(minute_trades)
            volume_quote.append(sum((t.amount * t.price for t in minute_trades), Decimal(0)))
            first_ts, last_ts = minute_trades[0].timestamp, minute_trades[-1].timestamp
        else:
            vwap = Decimal((open_ + high + low + close) // 4) * spec.tick
            volume_quote.append(Decimal(lots).scaleb(-spec.quantity_decimals) * vwap)
            first_ts, last_ts = start, end - 1
        bars.append(Bar(start, open_, high, low, close, lots, first_ts, last_ts))
        previous_close = close
    return Backfill(spec, fold_intervals(bars), tuple(trades), tuple(volume_quote))


def _trades(rng: random.Random, ids: random.Random, spec: MarketSpec, start: int, end: int,
            ohlc: tuple[int, int, int, int], lots: int, count: int) -> list[Trade]:
    """`count` trades in [start, end) reproducing the bar: open first, close last, high and low between."""
    open_, high, low, close = ohlc
    middle = [high, low] + [rng.randint(low, high) for _ in range(count - 4)]
    rng.shuffle(middle)
    prices = [open_, *middle, close]
    stamps = sorted(rng.randrange(start, end) for _ in prices)
    weights = [rng.random() + 0.05 for _ in prices]
    scale = (lots - count) / sum(weights)
    amounts = [1 + int(w * scale) for w in weights]
    amounts[-1] += lots - sum(amounts)  # floors leave a remainder; the last trade takes it
    trades: list[Trade] = []
    previous = open_
    for price, amount, stamp in zip(prices, amounts, stamps, strict=True):
        side: Side = "buy" if price > previous or (price == previous and rng.random() < 0.5) else "sell"
        previous = price
        trades.append(Trade(str(uuid.UUID(int=ids.getrandbits(128), version=4)), spec.market,
                            Decimal(amount).scaleb(-spec.quantity_decimals), Decimal(price) * spec.tick, side,
                            stamp))
    return trades

