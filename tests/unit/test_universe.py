"""Universe selection on scripted market data: each filter, top-N, hysteresis over simulated time."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from trading.config import ConfigError
from trading.universe import (
    BookLevels,
    Decision,
    Listing,
    MarketInputs,
    MarketTimer,
    TickerData,
    TopOfBook,
    UniverseConfig,
    UniverseState,
    depth_within,
    log_return_volatility_bps,
    markets_to_probe,
    select_universe,
)

D = Decimal
T0 = 1_800_000_000_000
S = 1000  # ms per second
CONFIG = UniverseConfig(
    top_n=3, min_quote_volume_eur=D("100000"), max_spread_bps=D("20"), min_volatility_bps=D("5"),
    max_volatility_bps=D("500"), min_price=D("0.01"), max_price=D("100000"), min_depth_eur=D("10000"),
    depth_bps=D("50"), blacklist=("PEPE-.*",), min_qualify_s=600, min_fail_s=1200, max_data_age_s=300,
    candle_interval="1h", volatility_candles=4)
ZIGZAG = tuple(D(p) for p in ("100", "101", "100", "101", "100"))  # log returns ±ln(1.01)


def market(volume: str = "1000000", *, last: str = "100", bid: str = "99.99", ask: str = "100.01",
           closes: tuple[Decimal, ...] | None = ZIGZAG, bid_size: str = "200", ask_size: str = "200",
           status: str = "trading", quote: str = "EUR", age_s: int = 5, now: int = T0, **extra: Any) -> MarketInputs:
    """A market that passes every filter of CONFIG unless told otherwise."""
    ticker = TickerData(now - age_s * S, "stream", last=D(last), volume_quote=D(volume), high=D(last) * D("1.02"),
                        low=D(last) * D("0.98"), bid=D(bid), ask=D(ask))
    levels = BookLevels([(D("99.99"), D(bid_size))], [(D("100.01"), D(ask_size))])
    fields: dict[str, Any] = {"listing": Listing(status, quote, D("0.01")), "ticker": ticker, "closes": closes,
                              "levels": levels}
    fields.update(extra)
    return MarketInputs(**fields)


def members_after(decision: Decision) -> UniverseState:
    """The state the next run reads: what was written to trading:universe and universe:state."""
    return UniverseState({m: decision.markets[m].since for m in decision.universe}, decision.timers)


def reasons(decision: Decision, name: str) -> list[str]:
    return decision.markets[name].reasons


# the filters --------------------------------------------------------------------------------------


def test_a_good_market_passes_every_filter_and_says_with_what_values() -> None:
    decision = select_universe({"BTC-EUR": market()}, CONFIG, UniverseState(), T0)
    assert decision.universe == ("BTC-EUR",)
    btc = decision.markets["BTC-EUR"]
    assert btc.action == "add" and btc.since == T0 and btc.score == D("1000000") and btc.rank == 1
    assert btc.reasons == [
        "added: the universe was empty",
        "status ok: status trading (only trading)",
        "quote ok: quote EUR (wanted EUR)",
        "blacklist ok: no pattern matches",
        "ticker ok: stream row, 5s old",
        "quote_volume ok: volumeQuote 1000000 >= 100000",
        "price ok: last 100 >= 0.01 and <= 100000",
        "spread ok: spread_bps 2 <= 20 (ticker stream)",
        "volatility ok: volatility_bps 114.9 >= 5 and <= 500 over 4 1h returns (stream)",
        "depth ok: thinner side 19998 EUR within 50 bps (bids 19998, asks 20002) >= 10000",
        "rank ok: 1 of 1 passing, by quote volume (<= top_n 3)",
    ]
    assert decision.rejects == {}


@pytest.mark.parametrize(("name", "inputs", "code", "fragment"), [
    ("LOW-EUR", market("99999.99"), "quote_volume", "volumeQuote 99999.99 < 100000"),
    ("DEAR-EUR", market(last="100001", bid="100000", ask="100001"), "price", "last 100001 > 100000"),
    ("DUST-EUR", market(last="0.001", bid="0.0009999", ask="0.0010001"), "price", "last 0.001 < 0.01"),
    ("WIDE-EUR", market(bid="99.8", ask="100.2"), "spread", "spread_bps 40 > 20 (ticker stream)"),
    ("ONESIDED-EUR", market(bid="100", ask="100"), "spread:missing", "no usable bid/ask"),
    ("FLAT-EUR", market(closes=(D(100),) * 5), "volatility", "volatility_bps 0 < 5"),
    ("WILD-EUR", market(closes=tuple(D(p) for p in ("100", "150", "100", "150", "100"))), "volatility",
     "volatility_bps 4681.91 > 500"),
    ("YOUNG-EUR", market(closes=ZIGZAG[:4]), "volatility:data", "4 closed 1h candles (stream), need 5"),
    ("UNPROBED-EUR", market(closes=None), "volatility:not_probed", "not among the markets probed"),
    ("BADCANDLE-EUR", market(errors={"candles": "malformed candle entry: field 'close' ..."}), "volatility:data",
     "candles unreadable: malformed candle entry"),
    ("THIN-EUR", market(bid_size="50"), "depth", "thinner side 4999.5 EUR within 50 bps"),
    ("CROSSED-EUR", market(levels=BookLevels([(D("101"), D(500))], [(D("100"), D(500))])), "depth:data",
     "crossed book: bid 101 >= ask 100"),
    ("EMPTYBOOK-EUR", market(levels=BookLevels([], [(D("100"), D(500))])), "depth:data", "one side of the book"),
    ("HALTED-EUR", market(status="halted"), "status", "status halted (only trading)"),
    ("USDC-EUR", market(quote="USDC"), "quote", "quote USDC (wanted EUR)"),
    ("PEPE-EUR", market(), "blacklist", "matches 'PEPE-.*'"),
    ("GONE-EUR", market(listing=None), "status:unlisted", "not listed in GET /markets"),
    ("btc-eur", market(), "name", "not BASE-EUR or BASE-USDC"),
    ("MISSING-EUR", market(ticker=None), "ticker:missing", "no ticker24h row"),
    ("NAN-EUR", market(ticker=None, errors={"ticker": "last must be finite, got 'NaN'"}), "ticker:malformed",
     "malformed: last must be finite, got 'NaN'"),
    ("NEG-EUR", market("-5"), "ticker:invalid", "missing or negative volumeQuote"),
    ("NOTRADES-EUR", market(ticker=TickerData(T0, "rest")), "ticker:invalid", "missing or negative volumeQuote, last"),
    ("OLD-EUR", market(age_s=301), "ticker:stale", "stream row is 301s old > max_data_age_s 300"),
])
def test_each_filter_rejects_what_it_should(name: str, inputs: MarketInputs, code: str, fragment: str) -> None:
    decision = select_universe({name: inputs, "GOOD-EUR": market()}, CONFIG, UniverseState(), T0)
    assert decision.universe == ("GOOD-EUR",)
    rejected = decision.markets[name]
    assert rejected.action == "reject" and not rejected.member and rejected.rank is None
    assert decision.rejects == {code: 1}
    assert rejected.note == f"not selected: {code}"
    assert any("FAIL" in r and fragment in r for r in rejected.reasons), rejected.reasons


def test_tick_and_range_filters_when_configured() -> None:
    config = replace(CONFIG, max_tick_bps=D("10"), min_range_bps=D("100"), max_range_bps=D("1000"))
    coarse = market(last="5", bid="4.999", ask="5.001")  # tick 0.01 on 5 EUR = 20 bps
    calm = market(ticker=replace(market().ticker, high=D("100.5"), low=D("100")))  # type: ignore[type-var]
    decision = select_universe({"COARSE-EUR": coarse, "CALM-EUR": calm, "GOOD-EUR": market()}, config,
                               UniverseState(), T0)
    assert decision.universe == ("GOOD-EUR",)
    assert "tick FAIL: tick_bps 20 > 10" in reasons(decision, "COARSE-EUR")
    assert "range FAIL: range_bps 50 < 100" in reasons(decision, "CALM-EUR")
    assert "range ok: range_bps 408.16 >= 100 and <= 1000" in reasons(decision, "GOOD-EUR")


def test_a_fresh_book_top_beats_the_ticker_for_the_spread() -> None:
    wide_top = TopOfBook(T0 - 1 * S, D("99"), D("101"))
    decision = select_universe({"BTC-EUR": market(top=wide_top)}, CONFIG, UniverseState(), T0)
    assert "spread FAIL: spread_bps 200 > 20 (book)" in reasons(decision, "BTC-EUR")
    stale_top = TopOfBook(T0 - 400 * S, D("99"), D("101"))
    decision = select_universe({"BTC-EUR": market(top=stale_top)}, CONFIG, UniverseState(), T0)
    assert "spread ok: spread_bps 2 <= 20 (ticker stream)" in reasons(decision, "BTC-EUR")


def test_switched_off_filters_neither_measure_nor_reject() -> None:
    config = replace(CONFIG, min_volatility_bps=D(0), max_volatility_bps=None, min_depth_eur=D(0))
    decision = select_universe({"BTC-EUR": market(closes=None, levels=None)}, config, UniverseState(), T0)
    assert decision.universe == ("BTC-EUR",)
    assert not any(r.startswith(("volatility", "depth")) for r in reasons(decision, "BTC-EUR"))


def test_rejects_are_counted_per_reason() -> None:
    inputs = {"A-EUR": market("1"), "B-EUR": market("2"), "C-EUR": market(status="halted"),
              "D-EUR": market(ticker=None), "E-EUR": market("3", bid="90", ask="110")}
    decision = select_universe(inputs, CONFIG, UniverseState(), T0)
    assert decision.universe == ()
    assert decision.rejects == {"quote_volume": 3, "spread": 1, "status": 1, "ticker:missing": 1}


# top-N ---------------------------------------------------------------------------------------------


def test_top_n_by_quote_volume_among_markets_passing_the_filters() -> None:
    inputs = {"A-EUR": market("500000"), "B-EUR": market("900000"), "C-EUR": market("700000"),
              "D-EUR": market("600000"), "E-EUR": market("800000", bid="90", ask="110")}
    decision = select_universe(inputs, CONFIG, UniverseState(), T0)
    assert decision.universe == ("B-EUR", "C-EUR", "D-EUR")
    assert [decision.markets[m].rank for m in ("B-EUR", "C-EUR", "D-EUR", "A-EUR")] == [1, 2, 3, 4]
    assert "rank FAIL: 4 of 4 passing, by quote volume (> top_n 3)" in reasons(decision, "A-EUR")
    assert decision.rejects == {"rank": 1, "spread": 1}
    assert [row["market"] for row in decision.table_rows()] == ["B-EUR", "C-EUR", "D-EUR", "A-EUR", "E-EUR"]


def test_equal_volumes_rank_by_name_so_reruns_decide_the_same() -> None:
    inputs = {m: market("500000") for m in ("D-EUR", "B-EUR", "A-EUR", "C-EUR")}
    first = select_universe(inputs, CONFIG, UniverseState(), T0)
    assert first.universe == ("A-EUR", "B-EUR", "C-EUR")
    again = select_universe(inputs, CONFIG, UniverseState(), T0)
    assert again == first


def test_the_probe_list_is_the_best_by_volume_among_cheap_passers_plus_members() -> None:
    config = replace(CONFIG, probe_limit=3)
    inputs = {f"M{i}-EUR": market(str(100_000 * (10 - i))) for i in range(6)}
    inputs["WIDE-EUR"] = market("9000000", bid="90", ask="110")
    assert markets_to_probe(inputs, config, (), T0) == ("M0-EUR", "M1-EUR", "M2-EUR")
    assert markets_to_probe(inputs, config, ("M5-EUR", "WIDE-EUR"), T0) == ("M0-EUR", "M1-EUR", "M2-EUR", "M5-EUR")


# hysteresis over simulated time ---------------------------------------------------------------------


def test_hysteresis_adds_and_removes_only_after_the_minimum_times() -> None:
    def at(t: int, **volumes: str) -> dict[str, MarketInputs]:
        return {f"{name}-EUR": market(v, now=t) for name, v in volumes.items()}

    # t0: the universe is empty, so the three qualifying markets join at once.
    t = T0
    d = select_universe(at(t, A="900000", B="800000", C="700000"), CONFIG, UniverseState(), t)
    assert d.universe == ("A-EUR", "B-EUR", "C-EUR") and d.with_action("add") == d.universe
    state = members_after(d)

    # +60 s: D outranks C. D must qualify for 600 s first; C stays while failing for < 1200 s.
    t = T0 + 60 * S
    d = select_universe(at(t, A="900000", B="800000", C="700000", D="850000"), CONFIG, state, t)
    assert d.universe == ("A-EUR", "B-EUR", "C-EUR")
    assert d.markets["D-EUR"].action == "wait" and d.markets["D-EUR"].note == "qualifying for 0s < min_qualify_s 600"
    assert d.markets["C-EUR"].note == "member kept by hysteresis: failing for 0s < min_fail_s 1200"
    state = members_after(d)

    # +660 s: D has qualified for 600 s, but all three slots are taken until C's grace ends.
    t = T0 + 660 * S
    d = select_universe(at(t, A="900000", B="800000", C="700000", D="850000"), CONFIG, state, t)
    assert d.universe == ("A-EUR", "B-EUR", "C-EUR")
    assert d.markets["D-EUR"].note == "qualifies, but no free slot (3 members, top_n 3)"
    assert d.markets["C-EUR"].note == "member kept by hysteresis: failing for 600s < min_fail_s 1200"
    state = members_after(d)

    # +1260 s: C has failed for 1200 s and leaves; D takes its slot in the same run.
    t = T0 + 1260 * S
    d = select_universe(at(t, A="900000", B="800000", C="700000", D="850000"), CONFIG, state, t)
    assert d.universe == ("A-EUR", "B-EUR", "D-EUR")
    assert d.with_action("remove") == ("C-EUR",) and d.with_action("add") == ("D-EUR",)
    assert d.markets["C-EUR"].note == "removed: failing for 1200s >= min_fail_s 1200"
    assert d.markets["D-EUR"].note == "added: qualifying for 1200s" and d.markets["D-EUR"].since == t
    assert d.markets["A-EUR"].since == T0  # members keep the time they entered
    assert "C-EUR" not in d.timers  # a removed, non-qualifying market leaves no state behind
    state = members_after(d)

    # A flapping member: missing data resets nothing while it is back within the grace period.
    t = T0 + 1300 * S
    d = select_universe({**at(t, A="900000", D="850000"), "B-EUR": market(ticker=None)}, CONFIG, state, t)
    assert d.markets["B-EUR"].action == "keep" and "ticker:missing" in d.rejects
    state = members_after(d)
    t = T0 + 1400 * S
    d = select_universe(at(t, A="900000", B="800000", D="850000"), CONFIG, state, t)
    assert d.markets["B-EUR"].note == "member: qualifies" and d.timers["B-EUR"].failing_since is None
    state = members_after(d)
    t = T0 + 2600 * S  # 1300 s after B first went missing, but only 0 s into this failure
    d = select_universe({**at(t, A="900000", D="850000"), "B-EUR": market(ticker=None)}, CONFIG, state, t)
    assert d.markets["B-EUR"].note == "member kept by hysteresis: failing for 0s < min_fail_s 1200"
    assert d.universe == ("A-EUR", "B-EUR", "D-EUR")


def test_a_candidate_that_stops_qualifying_starts_over() -> None:
    state = UniverseState({"A-EUR": T0 - 10_000 * S})
    d = select_universe({"A-EUR": market(), "N-EUR": market()}, CONFIG, state, T0)
    assert d.markets["N-EUR"].action == "wait"
    state = members_after(d)
    t = T0 + 500 * S
    d = select_universe({"A-EUR": market(now=t), "N-EUR": market("10", now=t)}, CONFIG, state, t)
    assert d.markets["N-EUR"].action == "reject" and "N-EUR" not in d.timers
    state = members_after(d)
    t = T0 + 700 * S  # 700 s after it first qualified, but only 0 s into its second spell
    d = select_universe({"A-EUR": market(now=t), "N-EUR": market(now=t)}, CONFIG, state, t)
    assert d.markets["N-EUR"].note == "qualifying for 0s < min_qualify_s 600"


def test_a_hard_failure_removes_a_member_at_once() -> None:
    state = UniverseState({"A-EUR": T0 - 3600 * S, "B-EUR": T0 - 3600 * S})
    d = select_universe({"A-EUR": market(), "B-EUR": market(status="halted")}, CONFIG, state, T0)
    assert d.universe == ("A-EUR",)
    assert d.markets["B-EUR"].note == "removed at once: hard filter status failed"


def test_the_universe_is_never_emptied() -> None:
    failing = MarketTimer(failing_since=T0 - 3600 * S)
    state = UniverseState({"A-EUR": T0 - 7200 * S, "B-EUR": T0 - 7200 * S}, {"A-EUR": failing, "B-EUR": failing})
    d = select_universe({"A-EUR": market("1"), "B-EUR": market(status="halted")}, CONFIG, state, T0)
    assert d.kept_previous and d.universe == ("A-EUR", "B-EUR")
    assert {d.markets[m].note for m in d.universe} == {
        "kept: nothing else would remain, and the universe is never emptied"}
    assert d.markets["A-EUR"].since == T0 - 7200 * S
    assert d.timers["A-EUR"].failing_since == T0 - 3600 * S  # the failure clock keeps running


def test_members_with_unknown_since_or_a_malformed_name() -> None:
    state = UniverseState({"A-EUR": None, "not a market": 5})
    d = select_universe({"A-EUR": market()}, CONFIG, state, T0)
    assert d.universe == ("A-EUR",) and d.markets["A-EUR"].since == T0
    assert d.markets["not a market"].action == "remove"
    assert d.markets["not a market"].note == "removed at once: hard filter name failed"


def test_the_hash_value_carries_score_rank_since_and_reasons() -> None:
    d = select_universe({"BTC-EUR": market("55800000.5")}, CONFIG, UniverseState(), T0)
    value = json.loads(d.markets["BTC-EUR"].universe_value(T0))
    assert value["score"] == "55800000.5" and value["rank"] == 1 and value["since"] == T0
    assert value["decided_at"] == T0 and value["reasons"] == d.markets["BTC-EUR"].reasons


# measurements and config -----------------------------------------------------------------------------


def test_volatility_is_the_sample_stdev_of_log_returns_in_bps() -> None:
    closes = [D("100"), D("102"), D("99"), D("101.5")]
    expected = statistics.stdev([math.log(102 / 100), math.log(99 / 102), math.log(101.5 / 99)]) * 10_000
    result = log_return_volatility_bps(closes)
    assert isinstance(result, Decimal) and abs(result - D(str(expected))) < D("0.0001")
    with pytest.raises(ValueError):
        log_return_volatility_bps([D("100"), D("0"), D("100")])


def test_depth_counts_only_levels_within_the_band_around_the_mid() -> None:
    levels = BookLevels(bids=[(D("100"), D("1")), (D("99.6"), D("2")), (D("99.4"), D("50"))],
                        asks=[(D("100.2"), D("1")), (D("100.6"), D("3")), (D("100.7"), D("50"))])
    depth = depth_within(levels, D("50"))  # mid 100.1: band 99.5995 .. 100.6005
    assert depth.mid == D("100.1")
    assert depth.bid_eur == D("299.2") and depth.ask_eur == D("402") and depth.thinner_eur == D("299.2")


def test_bad_config_names_every_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        UniverseConfig(top_n=0, min_quote_volume_eur=D("-1"), max_spread_bps=D("NaN"), min_price=D("10"),
                       max_price=D("5"), blacklist=("(",), candle_interval="7m", min_fail_s=-1)
    text = str(caught.value)
    for fragment in ("top_n=0", "min_quote_volume_eur=-1", "max_spread_bps=NaN", "min_price=10 > max_price=5",
                     "blacklist pattern '('", "candle_interval='7m'", "min_fail_s=-1"):
        assert fragment in text
    assert len(caught.value.problems) == 7
