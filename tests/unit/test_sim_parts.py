"""Simulator building blocks: catalog, candles, 24 h stats, rate limiter, request authentication."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from tests.unit.test_signing import VECTORS  # spec §1.2 vectors (secret "bitvavo", ts 1548172481125)
from trading.exchange.errors import BitvavoError
from trading.exchange.intervals import CANDLE_INTERVALS as INTERVALS
from trading.exchange.intervals import bucket_start
from trading.sim.__main__ import parse_args
from trading.sim.auth import ApiKey, verify
from trading.sim.candles import CandleSeries
from trading.sim.markets import CATALOG, DEFAULT_MARKETS
from trading.sim.ratelimit import RateLimiter
from trading.sim.stats24h import DAY_MS, Rolling24h


def _ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)  # type: ignore[misc]


def test_catalog_starts_on_the_tick_grid_at_the_real_levels() -> None:
    assert len(DEFAULT_MARKETS) >= 10 and "WMTX-EUR" not in DEFAULT_MARKETS
    assert CATALOG["WMTX-EUR"].status == "halted"
    for spec in CATALOG.values():
        assert spec.best_bid % spec.tick == 0, spec.market
        assert spec.min_order_base * spec.best_bid >= 5
    assert (CATALOG["BTC-EUR"].best_bid, CATALOG["PEAQ-EUR"].spread_ticks) == (Decimal(74096), 50)
    assert CATALOG["BTC-EUR"].price_decimals == 2  # tickSize "1.00": WS prices pad to "74968.00"


def test_bucket_starts() -> None:
    t = _ms(2026, 9, 24, 23, 7, 42)  # a Thursday
    assert bucket_start(t, "1m") == _ms(2026, 9, 24, 23, 7)
    assert bucket_start(t, "15m") == _ms(2026, 9, 24, 23, 0)
    assert bucket_start(t, "4h") == _ms(2026, 9, 24, 20, 0)
    assert bucket_start(t, "1d") == _ms(2026, 9, 24)
    assert bucket_start(t, "1W") == _ms(2026, 9, 21)  # Monday
    assert bucket_start(t, "1M") == _ms(2026, 9, 1)
    assert INTERVALS == ("1m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "1W", "1M")


def test_candle_series_newest_first_with_inclusive_start_exclusive_end() -> None:
    series = CandleSeries("1m")
    base = _ms(2026, 9, 24, 23, 0)
    for minute, price in ((0, "10"), (0, "12"), (0, "9"), (2, "11"), (3, "13")):  # minute 1 has no trades
        series.add_trade(base + minute * 60_000 + 5, Decimal(price), Decimal("0.5"))
    assert series.query(10, None, None) == [
        [base + 180_000, "13", "13", "13", "13", "0.5"],
        [base + 120_000, "11", "11", "11", "11", "0.5"],
        [base, "10", "12", "9", "9", "1.5"],
    ]
    assert [row[0] for row in series.query(1, None, None)] == [base + 180_000]
    assert [row[0] for row in series.query(10, base + 60_000, base + 180_000)] == [base + 120_000]


def test_rolling_24h_continues_the_loaded_history_with_trades() -> None:
    start = _ms(2026, 9, 24)
    history = [[start - 120_000, Decimal("99"), Decimal("104"), Decimal("98"), Decimal("100"), Decimal("3"),
                Decimal("300"), start - 120_000, start - 60_001],
               [start - 60_000, Decimal("100"), Decimal("101"), Decimal("97"), Decimal("99"), Decimal("1"),
                Decimal("99"), start - 60_000, start - 1]]
    stats = Rolling24h(8, history)
    assert stats.last_price == Decimal("99")
    stats.add_trade(start + 1000, Decimal("150"), Decimal("2"))
    row = stats.row("X-EUR", start + 2000, (Decimal("149"), Decimal("1")), None)
    assert (row["open"], row["openTimestamp"], row["high"], row["low"], row["last"]) == (
        "99", start - 120_000, "150", "97", "150")
    assert (row["volume"], row["volumeQuote"], row["bid"], row["ask"]) == ("6", "699", "149", None)
    later = stats.row("X-EUR", start - 60_001 + DAY_MS + 1, None, None)  # the oldest minute has left
    assert (later["open"], later["high"], later["volume"]) == ("100", "150", "3")
    empty = stats.row("X-EUR", start + DAY_MS + 5000, None, None)
    assert (empty["volume"], empty["volumeQuote"], empty["open"], empty["high"], empty["last"]) == (
        "0", "0", None, None, None)
    assert stats.last_price == Decimal("150")  # GET /ticker/price keeps the last trade


def test_rate_limiter_window_ban_and_reset() -> None:
    now = [120_000 + 59_000]
    limiter = RateLimiter(10, key_ban_ms=60_000, ip_ban_ms=900_000, clock_ms=lambda: now[0])
    assert limiter.charge("ip:a", 9, is_key=False).remaining == 1
    assert limiter.charge("ip:b", 10, is_key=False).remaining == 0  # budgets are per identity
    banned = limiter.charge("ip:a", 2, is_key=False)
    assert banned.banned and banned.banned_until_ms == now[0] + 900_000 and banned.reset_at_ms == 180_000
    now[0] = 181_000  # next minute: still banned
    assert limiter.charge("ip:a", 1, is_key=False).banned
    assert limiter.charge("ip:b", 1, is_key=False).remaining == 9  # its counter reset at the minute
    limiter.reset()
    assert not limiter.charge("ip:a", 1, is_key=False).banned
    assert limiter.charge("key:k", 11, is_key=True).banned_until_ms == now[0] + 60_000


SPEC_KEY = ApiKey("k" * 64, "bitvavo")


@pytest.mark.parametrize(("method", "path", "body", "sig"), VECTORS)
def test_verify_accepts_the_spec_vectors(method: str, path: str, body: str, sig: str) -> None:
    verify(SPEC_KEY, key=SPEC_KEY.key, timestamp="1548172481125", sig=sig, window=None, method=method,
           path_with_query=path, bodies=("{}", body), now_ms=1548172481125 + 500)


@pytest.mark.parametrize(("changes", "code"), [
    ({"key": None}, 300), ({"key": "short"}, 301), ({"key": "j" * 64}, 305),
    ({"timestamp": "12.5"}, 302), ({"timestamp": True}, 302), ({"window": "99"}, 303), ({"window": 60001}, 303),
    ({"now_ms": 1548172481125 + 10_001}, 304), ({"now_ms": 1548172481125 - 10_001}, 304),
    ({"sig": "ABC"}, 308), ({"sig": "0" * 64}, 309),
    # a bad key wins over a bad timestamp, a bad timestamp over a bad signature
    ({"key": "short", "timestamp": "x", "sig": "x"}, 301), ({"timestamp": "x", "sig": "x"}, 302),
])
def test_verify_checks_in_the_servers_order(changes: dict[str, object], code: int) -> None:
    method, path, body, sig = VECTORS[1]
    request: dict[str, object] = {"key": SPEC_KEY.key, "timestamp": "1548172481125", "sig": sig, "window": None,
                                  "now_ms": 1548172481125}
    request.update(changes)
    with pytest.raises(BitvavoError) as info:
        verify(SPEC_KEY, method=method, path_with_query=path, bodies=(body,), **request)  # type: ignore[arg-type]
    assert (info.value.error_code, info.value.http_status) == (code, 403)


def test_cli_defaults_and_flags() -> None:
    config, level = parse_args([])
    assert (config.host, config.port, config.rate_limit, config.book_rate, level) == (
        "127.0.0.1", 0, 1000, 10.0, "WARNING")
    assert len(config.api_key) == 64 and config.markets == DEFAULT_MARKETS
    assert (config.key_ban_seconds, config.ip_ban_seconds, config.history_minutes) == (60.0, 900.0, 1440)
    config, _ = parse_args(["--port", "8123", "--seed", "4", "--markets", "BTC-EUR,WMTX-EUR", "--balance",
                            "EUR=5.5,btc=0.1", "--ban-seconds", "2", "--rate-limit", "50", "--book-rate", "40",
                            "--history-minutes", "0"])
    assert (config.port, config.seed, config.markets, config.history_minutes) == (8123, 4, ("BTC-EUR", "WMTX-EUR"), 0)
    assert config.balances == {"EUR": Decimal("5.5"), "BTC": Decimal("0.1")}
    assert (config.key_ban_seconds, config.ip_ban_seconds, config.rate_limit, config.book_rate) == (2, 2, 50, 40)
    for bad in (["--api-key", "short"], ["--markets", "NOPE-EUR"], ["--balance", "EUR=NaN"], ["--book-rate", "0"],
                ["--history-minutes", "1441"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
