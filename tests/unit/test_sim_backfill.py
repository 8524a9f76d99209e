"""A fresh simulator serves 24 h of history: valid candles of every interval, trades that make up the newest
candles, and a ticker24h row summarising them, deterministic under (seed, start), joining the live market."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from trading.exchange.intervals import CANDLE_INTERVALS, FIXED_INTERVAL_MS, bucket_start
from trading.exchange.models import Candle
from trading.sim.backfill import HISTORY_MINUTES, TRADE_MINUTES, backfill
from trading.sim.config import SimConfig
from trading.sim.exchange import SimExchange
from trading.sim.markets import CATALOG

START = 1_790_000_123_456  # mid-minute: the newest bucket is partial
MARKETS = ("BTC-EUR", "XRP-EUR", "PEAQ-EUR", "WMTX-EUR")
MINUTE = 60_000


def _exchange(seed: int = 5, start: int = START) -> SimExchange:
    return SimExchange(SimConfig(seed=seed, markets=MARKETS), clock_ms=lambda: start,
                       clock_ns=lambda: start * 1_000_000)


def _served(exchange: SimExchange) -> dict[str, Any]:
    return {market: {"candles": {i: exchange.candles[market][i].query(1440, None, None) for i in CANDLE_INTERVALS},
                     "trades": exchange.trades[market].query(limit=1000),
                     "ticker24h": exchange.ticker24h_row(market)} for market in MARKETS}


def test_same_seed_and_start_give_the_same_history_another_seed_another() -> None:
    first = _served(_exchange())
    assert first == _served(_exchange())
    assert first["BTC-EUR"]["candles"]["1m"] != _served(_exchange(seed=6))["BTC-EUR"]["candles"]["1m"]


@pytest.mark.parametrize("market", MARKETS)
def test_candles_are_valid_aligned_newest_first_and_agree_across_intervals(market: str) -> None:
    exchange = _exchange()
    spec = CATALOG[market]
    one_minute = exchange.candles[market]["1m"].query(1440, None, None)
    assert len(one_minute) == HISTORY_MINUTES
    assert one_minute[0][0] == bucket_start(START - 1, "1m") and one_minute[0][4] == str(spec.best_bid)
    for interval in CANDLE_INTERVALS:
        rows = exchange.candles[market][interval].query(1440, None, None)
        candles = [Candle.from_wire(row) for row in rows]  # the project's parser: OHLC consistent, volume >= 0
        starts = [c.open_ts for c in candles]
        assert starts == sorted(starts, reverse=True) and len(set(starts)) == len(starts)
        assert all(bucket_start(ts, interval) == ts for ts in starts)
        assert all(c.volume > 0 and (c.open, c.high, c.low, c.close) == tuple(
            (p / spec.tick).to_integral_value() * spec.tick for p in (c.open, c.high, c.low, c.close))
            for c in candles)
        # each bucket is exactly the one-minute candles it holds
        held: dict[int, list[Candle]] = {}
        for raw in one_minute:
            held.setdefault(bucket_start(raw[0], interval), []).append(Candle.from_wire(raw))
        assert sorted(held) == sorted(starts)
        for candle in candles:
            inside = held[candle.open_ts]
            assert candle.open == inside[-1].open and candle.close == inside[0].close
            assert candle.high == max(c.high for c in inside) and candle.low == min(c.low for c in inside)
            assert candle.volume == sum((c.volume for c in inside), Decimal(0))
    assert len(exchange.candles[market]["5m"].query(1440, None, None)) >= 49  # universe selection's window


def test_limit_start_and_end_are_honoured() -> None:
    series = _exchange().candles["BTC-EUR"]["5m"]
    newest = bucket_start(START - 1, "5m")
    assert [r[0] for r in series.query(2, None, None)] == [newest, newest - 300_000]
    window = series.query(1440, newest - 3 * 300_000, newest - 300_000)  # start inclusive, end exclusive
    assert [r[0] for r in window] == [newest - 2 * 300_000, newest - 3 * 300_000]
    assert [r[0] for r in series.query(1, newest - 3 * 300_000, newest)] == [newest - 300_000]


@pytest.mark.parametrize("market", ("BTC-EUR", "PEAQ-EUR"))
def test_recent_trades_make_up_the_newest_minutes_and_precede_the_start(market: str) -> None:
    past = backfill(CATALOG[market], 5, START)
    trades = past.trades
    assert trades and all(t.timestamp < START for t in trades)
    assert [t.timestamp for t in trades] == sorted(t.timestamp for t in trades)
    minutes = {bar.start: bar for bar in past.bars["1m"]}
    by_minute: dict[int, list[Any]] = {}
    for trade in trades:
        by_minute.setdefault(bucket_start(trade.timestamp, "1m"), []).append(trade)
    assert len(by_minute) == TRADE_MINUTES and max(by_minute) == bucket_start(START - 1, "1m")
    tick, lot = CATALOG[market].tick, Decimal(1).scaleb(-CATALOG[market].quantity_decimals)
    for start, group in by_minute.items():
        bar = minutes[start]
        prices = [t.price / tick for t in group]
        assert (prices[0], max(prices), min(prices), prices[-1]) == (bar.open, bar.high, bar.low, bar.close)
        assert sum(t.amount for t in group) / lot == bar.volume and all(t.amount > 0 for t in group)
    assert len({t.trade_id for t in trades}) == len(trades)


def test_ticker24h_summarises_the_history_and_live_trading_continues_from_it() -> None:
    exchange = _exchange()
    minutes = exchange.candles["BTC-EUR"]["1m"].query(1440, None, None)
    row = exchange.ticker24h_row("BTC-EUR")
    assert row["open"] == minutes[-1][1] and row["last"] == minutes[0][4] == "74096"
    assert row["high"] == max((r[2] for r in minutes), key=Decimal)
    assert row["low"] == min((r[3] for r in minutes), key=Decimal)
    assert Decimal(row["volume"]) == sum((Decimal(r[5]) for r in minutes), Decimal(0))
    daily = CATALOG["BTC-EUR"].volume_quote_24h
    assert daily * Decimal("0.7") < Decimal(row["volumeQuote"]) < daily * Decimal("1.3")
    assert row["closeTimestamp"] < START <= row["startTimestamp"] + 86_400_000
    # the live book starts where the history ends
    best_bid = exchange.engine.best_bid("BTC-EUR")
    assert best_bid is not None and best_bid[0] == Decimal(row["last"])


def test_history_is_stamped_relative_to_the_start() -> None:
    later = START + 7 * FIXED_INTERVAL_MS["1h"]
    newest = _exchange(start=later).candles["BTC-EUR"]["1m"].query(1, None, None)[0]
    assert newest[0] == bucket_start(later - 1, "1m")
    on_the_minute = START - START % MINUTE
    rows = _exchange(start=on_the_minute).candles["BTC-EUR"]["1m"].query(1440, None, None)
    assert rows[0][0] == on_the_minute - MINUTE and rows[-1][0] == on_the_minute - HISTORY_MINUTES * MINUTE


def test_a_shorter_or_no_past_on_request() -> None:
    short = SimExchange(SimConfig(markets=("BTC-EUR",), history_minutes=30), clock_ms=lambda: START,
                        clock_ns=lambda: START * 1_000_000)
    assert len(short.candles["BTC-EUR"]["1m"].query(1440, None, None)) == 30
    assert len(short.trades["BTC-EUR"].query(limit=1000)) >= 30 * 4
    daily = CATALOG["BTC-EUR"].volume_quote_24h
    assert Decimal(short.ticker24h_row("BTC-EUR")["volumeQuote"]) < daily * Decimal("1.2") * 30 / 1440
    none = SimExchange(SimConfig(markets=("BTC-EUR",), history_minutes=0), clock_ms=lambda: START,
                       clock_ns=lambda: START * 1_000_000)
    assert all(not series.query(1440, None, None) for series in none.candles["BTC-EUR"].values())
    assert none.trades["BTC-EUR"].query(limit=10) == [] and none.last_price("BTC-EUR") is None
    row = none.ticker24h_row("BTC-EUR")
    assert (row["open"], row["last"], row["volume"]) == (None, None, "0")
    none.step_all()  # live trading starts from nothing, as before the history existed
    with pytest.raises(ValueError, match=r"0\.\.1440"):
        backfill(CATALOG["BTC-EUR"], 5, START, 1441)
