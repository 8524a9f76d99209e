"""Signals, pure: book entry checks, rolling stats against hand-computed values, the baseline's
thresholds, strategy plug-ins, and the evaluator's idempotency, staleness and throttling."""

from __future__ import annotations

import math
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from trading.config import Settings
from trading.signals import (
    STRATEGIES,
    BadBookEntry,
    BookTop,
    MarketState,
    MarketWindow,
    Outcome,
    SignalDecision,
    SignalEvaluator,
    SignalParams,
    StrategyError,
    StrategyLoadError,
    WindowReset,
    baseline,
    load_strategy,
    parse_book_entry,
    signal_id_for,
)

PARAMS = SignalParams(max_spread_bps=Decimal("25"), min_volatility_bps=Decimal("2"), window=3)


def book(nonce: int, bid: str, ask: str, *, ts: int | None = None, market: str = "BTC-EUR") -> dict[str, str]:
    ts = 1_000_000 + 100 * nonce if ts is None else ts
    return {"v": "1", "ts": str(ts), "recv_ts": str(ts + 3), "market": market, "nonce": str(nonce), "bid": bid,
            "bid_size": "0.5", "ask": ask, "ask_size": "0.7"}


def top(nonce: int, mid: str, *, ts: int, half_spread: str = "0.01") -> BookTop:
    m, h = Decimal(mid), Decimal(half_spread)
    return BookTop("BTC-EUR", nonce, ts, None, m - h, Decimal(1), m + h, Decimal(1))


def evaluator(params: SignalParams = PARAMS, strategy: str = "baseline", **kwargs: Any) -> SignalEvaluator:
    return SignalEvaluator(load_strategy(strategy), params, **kwargs)


# -- book entries ---------------------------------------------------------------------------------

def test_a_good_entry_parses_to_exact_decimals() -> None:
    parsed = parse_book_entry(book(7, "99.99", "100.01"), lambda m: True)
    assert parsed == BookTop("BTC-EUR", 7, 1_000_700, 1_000_703, Decimal("99.99"), Decimal("0.5"),
                             Decimal("100.01"), Decimal("0.7"))
    assert parsed.mid == Decimal("100")
    assert parsed.spread_bps == Decimal("2")  # 0.02 / 100 * 10000


def _without(fields: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in fields.items() if k not in names}


@pytest.mark.parametrize(("fields", "kind", "says"), [
    (_without(book(1, "99", "100"), "market"), "missing_field", "'market'"),
    (_without(book(1, "99", "100"), "nonce"), "missing_field", "'nonce'"),
    (_without(book(1, "99", "100"), "ts"), "missing_field", "'ts'"),
    (_without(book(1, "99", "100"), "bid_size"), "missing_field", "'bid_size'"),
    (_without(book(1, "99", "100"), "ask"), "missing_field", "'ask'"),
    (book(1, "abc", "100"), "malformed", "bid"),
    (book(1, "NaN", "100"), "malformed", "bid"),
    (book(1, "99", "Infinity"), "malformed", "ask"),
    ({**book(1, "99", "100"), "nonce": "x1"}, "malformed", "nonce"),
    ({**book(1, "99", "100"), "nonce": "-4"}, "malformed", "nonce"),
    ({**book(1, "99", "100"), "v": "9"}, "malformed", "schema version"),
    (book(1, "-99", "100"), "bad_price", "'bid'"),
    (book(1, "0", "100"), "bad_price", "'bid'"),
    ({**book(1, "99", "100"), "ask_size": "-1"}, "bad_price", "'ask_size'"),
    ({**book(1, "99", "100"), "bid_size": "0"}, "bad_price", "'bid_size'"),
    (book(1, "101", "100"), "crossed", "bid 101 >= ask 100"),
    (book(1, "100", "100"), "crossed", "bid 100 >= ask 100"),
    (book(1, "99", "100", market="btc-eur"), "unknown_market", "not a Bitvavo market name"),
    (book(1, "99", "100", market="NOPE"), "unknown_market", "not a Bitvavo market name"),
    (book(1, "99", "100", market="DOGE-EUR"), "unknown_market", "not one of the configured markets"),
])
def test_bad_entries_are_refused_with_a_kind_and_a_reason(fields: dict[str, str], kind: str, says: str) -> None:
    with pytest.raises(BadBookEntry) as refused:
        parse_book_entry(fields, lambda market: market in ("BTC-EUR", "ETH-EUR"))
    assert refused.value.kind == kind
    assert says in str(refused.value)


def test_an_empty_side_is_a_one_sided_book_not_bad_input() -> None:
    assert parse_book_entry(_without(book(1, "99", "100"), "ask", "ask_size"), lambda m: True) is None
    with pytest.raises(BadBookEntry):  # a one-sided entry is still checked
        parse_book_entry(_without(book(1, "-99", "100"), "ask", "ask_size"), lambda m: True)


# -- rolling window -------------------------------------------------------------------------------

def test_rolling_stats_match_hand_computed_values() -> None:
    window = MarketWindow(3)
    window.add(top(1, "100", ts=1000), max_gap_ms=60_000)
    assert window.volatility_bps() is None  # no return yet
    assert window.mean_mid() == Decimal("100")
    window.add(top(2, "101", ts=1100), max_gap_ms=60_000)
    window.add(top(3, "100", ts=1200), max_gap_ms=60_000)
    # returns ln(101/100) = +0.00995033085, ln(100/101) = -0.00995033085; RMS = 0.00995033085
    assert window.volatility_bps() == Decimal("99.5033")
    assert window.mean_mid() == Decimal(301) / 3
    # spreads 0.02/100, 0.02/101, 0.02/100 in bps: 2, 1.9802, 2 -> mean 1.99340
    assert window.mean_spread_bps() == Decimal("1.9934")


def test_the_window_keeps_only_the_newest_samples() -> None:
    window = MarketWindow(3)
    for nonce, mid in enumerate(["50", "100", "102", "100"], 1):
        window.add(top(nonce, mid, ts=1000 + nonce), max_gap_ms=60_000)
    assert [s.mid for s in window.samples] == [Decimal("100"), Decimal("102"), Decimal("100")]
    expected = math.sqrt((math.log(1.02) ** 2 + math.log(100 / 102) ** 2) / 2) * 10_000  # 50 is out
    assert window.volatility_bps() == Decimal(f"{expected:.4f}") == Decimal("198.0263")


def test_a_flat_window_has_zero_volatility() -> None:
    window = MarketWindow(2)
    window.add(top(1, "100", ts=1), max_gap_ms=60_000)
    window.add(top(2, "100", ts=2), max_gap_ms=60_000)
    assert window.volatility_bps() == Decimal("0")


def test_a_silence_longer_than_the_gap_restarts_the_window() -> None:
    window = MarketWindow(3, last_signal_ts=None)
    window.add(top(1, "100", ts=1_000), max_gap_ms=5_000)
    assert window.add(top(2, "101", ts=6_000), max_gap_ms=5_000) is None  # exactly the gap: kept
    window.last_signal_ts = 6_000
    assert window.add(top(3, "150", ts=11_001), max_gap_ms=5_000) is WindowReset.GAP
    assert [s.mid for s in window.samples] == [Decimal("150")]
    assert window.last_signal_ts is None


def test_duplicates_and_a_restarted_nonce_sequence() -> None:
    window = MarketWindow(3)
    window.add(top(500, "100", ts=2_000), max_gap_ms=60_000)
    assert window.is_duplicate(500, 2_000)
    assert window.is_duplicate(499, 1_900)  # an older entry replayed
    assert not window.is_duplicate(501, 2_000)
    # A lower nonce with a newer exchange time: the exchange (or simulator) restarted its sequence.
    assert not window.is_duplicate(3, 2_500)
    assert window.add(top(3, "100", ts=2_500), max_gap_ms=60_000) is WindowReset.NONCE_RESTART
    assert window.last_nonce == 3 and len(window.samples) == 1


def test_a_window_survives_json_and_a_corrupt_one_is_refused() -> None:
    window = MarketWindow(4, last_signal_ts=1_100)
    for nonce, mid in enumerate(["100.5", "101", "99.25"], 1):
        window.add(top(nonce, mid, ts=1_000 + 100 * nonce), max_gap_ms=60_000)
    back = MarketWindow.from_json(window.to_json(), 4)
    assert list(back.samples) == list(window.samples)
    assert (back.last_nonce, back.last_ts, back.last_signal_ts) == (3, 1_300, 1_100)
    assert back.volatility_bps() == window.volatility_bps()
    assert [s.mid for s in MarketWindow.from_json(window.to_json(), 2).samples] == [Decimal(101), Decimal("99.25")]
    for corrupt in ("not json", '{"nonce": 1}', '{"nonce": "1", "ts": 1, "last_signal_ts": null, "samples": []}',
                    '{"nonce": 1, "ts": 1, "last_signal_ts": null, "samples": [[1, "NaN", "1"]]}'):
        with pytest.raises(ValueError, match="not a persisted market window"):
            MarketWindow.from_json(corrupt, 4)


# -- the baseline strategy ------------------------------------------------------------------------

def state(*, mid: str = "100", mean_mid: str = "100.5", spread: str = "2", vol: str | None = "100",
          count: int = 3) -> MarketState:
    m = Decimal(mid)
    return MarketState("BTC-EUR", 9, 1_000, m - 1, Decimal(1), m + 1, Decimal(1), m, Decimal(spread),
                       Decimal(mean_mid), Decimal(spread), None if vol is None else Decimal(vol), count, None)


# Default state: a full window of 3, mid 100 vs mean 100.5 (-49.7512 bps), spread 2 bps, volatility 100 bps;
# thresholds: spread <= 25 bps, volatility >= 2 bps.
@pytest.mark.parametrize(("changes", "side", "strength"), [
    ({}, "buy", "0.4975"),  # 49.7512 / 100
    ({"mid": "101"}, "sell", "0.4975"),  # (101 - 100.5) / 100.5 = +49.7512 bps
    ({"spread": "25"}, "buy", "0.4975"),  # at the limit
    ({"spread": "25.0001"}, None, None),
    ({"vol": "2"}, "buy", "1"),  # at the limit; 49.7512 / 2 capped at 1
    ({"vol": "1.9999"}, None, None),
    ({"count": 2}, None, None),  # window not full
    ({"vol": None}, None, None),  # volatility undefined
    ({"vol": "0"}, None, None),  # flat window
    ({"mean_mid": "100"}, None, None),  # at the mean: no side
    ({"mean_mid": "100.02"}, "buy", "0.02"),  # -1.9996 bps / 100
])
def test_baseline_thresholds(changes: dict[str, Any], side: str | None, strength: str | None) -> None:
    decision = baseline(state(**changes), PARAMS)
    if side is None:
        assert decision is None
        return
    assert decision is not None
    assert (decision.side, decision.strength) == (side, Decimal(strength or ""))


def test_baseline_reason_names_the_numbers() -> None:
    decision = baseline(state(), PARAMS)
    assert decision is not None
    assert decision.reason == ("mean-reversion: mid -49.7512 bps from the 3-sample mean; spread 2 <= 25 bps; "
                               "vol 100 >= 2 bps")


# -- the evaluator --------------------------------------------------------------------------------

def test_scripted_entries_give_the_hand_computed_signal() -> None:
    ev = evaluator()
    outcomes = [ev.evaluate(book(n, b, a), now_ms=1_000_000 + 100 * n)
                for n, (b, a) in enumerate([("99.99", "100.01"), ("100.99", "101.01"), ("99.99", "100.01")], 1)]
    assert [e.outcome for e in outcomes] == [Outcome.QUIET, Outcome.QUIET, Outcome.SIGNAL]
    assert outcomes[2].signal == {
        "ts": 1_000_300, "signal_id": signal_id_for("baseline", "BTC-EUR", 3), "market": "BTC-EUR", "side": "buy",
        # mean mid 100.3333: deviation -33.2226 bps; volatility 99.5033 bps; strength 33.2226 / 99.5033
        "strength": Decimal("0.3339"), "ref_price": Decimal("100"), "spread_bps": Decimal("2"),
        "volatility": Decimal("99.5033"), "strategy": "baseline",
        "reason": "mean-reversion: mid -33.2226 bps from the 3-sample mean; spread 2 <= 25 bps; vol 99.5033 >= 2 bps",
    }


def test_signal_ids_are_deterministic_per_strategy_market_and_nonce() -> None:
    assert signal_id_for("baseline", "BTC-EUR", 3) == signal_id_for("baseline", "BTC-EUR", 3)
    assert len({signal_id_for("baseline", "BTC-EUR", 3), signal_id_for("baseline", "BTC-EUR", 4),
                signal_id_for("baseline", "ETH-EUR", 3), signal_id_for("other", "BTC-EUR", 3)}) == 4


def test_duplicates_are_skipped_without_touching_the_window() -> None:
    ev = evaluator()
    ev.evaluate(book(5, "99", "100"), now_ms=1_000_500)
    before = ev.windows["BTC-EUR"].to_json()
    for nonce in (5, 4):
        result = ev.evaluate(book(nonce, "50", "60"), now_ms=1_000_500)
        assert result.outcome is Outcome.DUPLICATE and not result.window_changed
    assert ev.windows["BTC-EUR"].to_json() == before


def test_stale_entries_feed_the_window_but_never_signal() -> None:
    ev = evaluator(replace(PARAMS, max_book_age_ms=5_000))
    entries = [book(n, b, a) for n, (b, a) in enumerate([("99.99", "100.01"), ("100.99", "101.01"),
                                                          ("99.99", "100.01")], 1)]
    results = [ev.evaluate(e, now_ms=int(e["ts"]) + 5_001) for e in entries]
    assert [r.outcome for r in results] == [Outcome.STALE] * 3
    assert all(r.signal is None and r.window_changed for r in results)
    assert len(ev.windows["BTC-EUR"].samples) == 3
    assert ev.evaluate(book(4, "100.99", "101.01"), now_ms=1_000_400 + 5_000).outcome is Outcome.SIGNAL


def test_signals_are_throttled_per_market_on_exchange_time() -> None:
    ev = evaluator(replace(PARAMS, min_interval_ms=250))
    mids = [("99.99", "100.01"), ("100.99", "101.01")] * 4
    outcomes = [ev.evaluate(book(n, b, a), now_ms=1_000_000 + 100 * n).outcome
                for n, (b, a) in enumerate(mids, 1)]
    # ts every 100 ms: a signal at nonce 3, then not before 250 ms later (nonce 6), ...
    assert outcomes == [Outcome.QUIET, Outcome.QUIET, Outcome.SIGNAL, Outcome.THROTTLED, Outcome.THROTTLED,
                        Outcome.SIGNAL, Outcome.THROTTLED, Outcome.THROTTLED]
    other = ev.evaluate(book(1, "10", "10.001", market="ETH-EUR"), now_ms=1_000_100)
    assert other.outcome is Outcome.QUIET  # one market's throttle does not touch another's window


def test_restore_undoes_an_uncommitted_evaluation() -> None:
    ev = evaluator()
    first = ev.evaluate(book(1, "99.99", "100.01"), now_ms=1_000_100)
    ev.restore(first)
    assert "BTC-EUR" not in ev.windows  # the market was new
    ev.evaluate(book(1, "99.99", "100.01"), now_ms=1_000_100)
    ev.evaluate(book(2, "100.99", "101.01"), now_ms=1_000_200)
    third = ev.evaluate(book(3, "99.99", "100.01"), now_ms=1_000_300)
    ev.restore(third)
    again = ev.evaluate(book(3, "99.99", "100.01"), now_ms=1_000_300)
    assert again.outcome is Outcome.SIGNAL and again.signal == third.signal


def test_a_failing_strategy_leaves_the_window_as_it_was() -> None:
    def explode(state: MarketState, params: SignalParams) -> SignalDecision | None:
        raise ZeroDivisionError("bug")

    ev = evaluator()
    ev.strategy = replace(ev.strategy, name="explode", decide=explode)
    ev.windows["BTC-EUR"] = MarketWindow(3)
    with pytest.raises(StrategyError, match="'explode' failed on BTC-EUR nonce 1: ZeroDivisionError: bug"):
        ev.evaluate(book(1, "99", "100"), now_ms=1_000_100)
    assert not ev.windows["BTC-EUR"].samples


# -- plugging in a strategy -----------------------------------------------------------------------

def momentum(state: MarketState, params: SignalParams) -> SignalDecision | None:
    """A user's strategy: follow the move once the window is full (used by name in the tests)."""
    if state.sample_count < params.window or state.mid == state.mean_mid:
        return None
    threshold = Decimal(params.options.get("min_move_bps", "0"))
    move_bps = (state.mid - state.mean_mid) / state.mean_mid * 10_000
    if abs(move_bps) < threshold:
        return None
    return SignalDecision("buy" if move_bps > 0 else "sell", Decimal("0.5"), "momentum")


def test_a_custom_strategy_is_loaded_by_dotted_path_and_drives_the_signals() -> None:
    spec = "tests.unit.test_signals:momentum"
    ev = evaluator(replace(PARAMS, options={"min_move_bps": "10"}), strategy=spec)
    results = [ev.evaluate(book(n, b, a), now_ms=1_000_000 + 100 * n)
               for n, (b, a) in enumerate([("99.99", "100.01"), ("100.99", "101.01"), ("101.99", "102.01")], 1)]
    signal = results[2].signal
    assert signal is not None
    assert (signal["side"], signal["strength"], signal["reason"], signal["strategy"]) == ("buy", Decimal("0.5"),
                                                                                          "momentum", spec)
    assert signal["signal_id"] == signal_id_for(spec, "BTC-EUR", 3)


def test_a_custom_strategy_can_be_registered_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STRATEGIES, "momentum", momentum)
    loaded = load_strategy("momentum")
    assert loaded.name == "momentum" and loaded.decide is momentum


def test_a_strategy_returning_something_else_is_an_error() -> None:
    ev = evaluator()
    ev.strategy = replace(ev.strategy, decide=lambda state, params: {"side": "buy"})
    with pytest.raises(StrategyError, match="not a SignalDecision"):
        ev.evaluate(book(1, "99", "100"), now_ms=1_000_100)


@pytest.mark.parametrize(("spec", "says"), [
    ("nope", "use one of ['baseline'] or 'package.module:function'"),
    ("tests.unit.no_such_module:f", "cannot import"),
    ("trading.signals:not_there", "has no callable 'not_there'"),
    ("trading.signals:BPS", "has no callable 'BPS'"),
    (":f", "use one of"),
])
def test_bad_strategy_names_fail_with_the_fix(spec: str, says: str) -> None:
    with pytest.raises(StrategyLoadError) as refused:
        load_strategy(spec)
    assert says in str(refused.value)


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"side": "hold"}, "side must be"),
    ({"strength": Decimal("1.01")}, "strength must be"),
    ({"strength": Decimal("-0.1")}, "strength must be"),
    ({"strength": 0.5}, "strength must be"),
    ({"reason": ""}, "reason must be"),
])
def test_a_decision_is_checked(kwargs: dict[str, Any], says: str) -> None:
    values: dict[str, Any] = {"side": "buy", "strength": Decimal("0.5"), "reason": "r", **kwargs}
    with pytest.raises(ValueError, match=says):
        SignalDecision(**values)


# -- parameters -----------------------------------------------------------------------------------

def test_params_come_from_the_env_and_parameters_override_them() -> None:
    settings = Settings.from_env({"SIGNAL_MAX_SPREAD_BPS": "12", "SIGNAL_MIN_VOLATILITY_BPS": "1.5",
                                  "SIGNAL_WINDOW": "40", "STALE_BOOK_MS": "3000"})
    defaults = SignalParams.from_settings(settings)
    assert (defaults.max_spread_bps, defaults.min_volatility_bps, defaults.window, defaults.max_book_age_ms) == (
        Decimal("12"), Decimal("1.5"), 40, 3000)
    overridden = SignalParams.from_settings(settings, max_spread_bps=7.5, min_volatility_bps="0.25", window=5,
                                            min_interval_ms=0, max_book_age_ms=100, options={"k": "v"})
    assert (overridden.max_spread_bps, overridden.min_volatility_bps, overridden.window) == (
        Decimal("7.5"), Decimal("0.25"), 5)
    assert (overridden.min_interval_ms, overridden.max_book_age_ms, overridden.options) == (0, 100, {"k": "v"})


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"max_spread_bps": "abc"}, "max_spread_bps is not a decimal"),
    ({"max_spread_bps": "0"}, "max_spread_bps must be a positive"),
    ({"max_spread_bps": float("nan")}, "max_spread_bps must be finite"),
    ({"min_volatility_bps": "-1"}, "min_volatility_bps must be >= 0"),
    ({"window": 1}, "window must be >= 2"),
    ({"min_interval_ms": -1}, "min_interval_ms must be >= 0"),
])
def test_bad_parameters_name_themselves(kwargs: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        SignalParams.from_settings(Settings(), **kwargs)
