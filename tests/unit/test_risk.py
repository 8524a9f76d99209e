"""The trading core's guards (trading/risk.py) and its pure sizing and signal checks, table-driven."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from itertools import combinations
from typing import Any

import pytest

from trading.config import ConfigError, Settings
from trading.consumer import RejectEntry
from trading.exchange.market_rules import market_rules_from_wire
from trading.golive import GateStatus
from trading.risk import (
    GUARD_NAMES,
    Context,
    Limits,
    OpenIntent,
    Proposal,
    context_from_redis,
    evaluate,
    first_failure,
    reduces_position,
    utc_date,
)
from trading.trading_core import (
    MAX_SLIPPAGE_BPS,
    Signal,
    parse_signal,
    round_amount,
    round_price,
    size_order,
)

NOW = 1_790_000_000_000
D = Decimal
LIMITS = Limits(max_notional_per_order=D(250), max_exposure_per_market=D(1000), max_exposure_total=D(5000),
                max_open_intents=20, max_daily_loss=D(250), stale_book_ms=5_000, market_cooldown_ms=30_000)
PROPOSAL = Proposal(market="BTC-EUR", side="buy", amount=D("0.001"), notional=D(50), signal_ts=NOW - 100,
                    min_notional=D(5))
CONTEXT = Context(now_ms=NOW)


def _judge(proposal: dict[str, Any], context: dict[str, Any], limits: dict[str, Any] | None = None) -> list[str]:
    """Names of the failing guards, in evaluation order."""
    outcomes = evaluate(replace(PROPOSAL, **proposal), replace(CONTEXT, **context), replace(LIMITS, **(limits or {})))
    assert [o.guard for o in outcomes] == list(GUARD_NAMES)
    return [o.guard for o in outcomes if not o.passed]


def _open(n: int, market: str = "ETH-EUR", notional: str = "0") -> dict[str, OpenIntent]:
    return {f"intent-{i}": OpenIntent(market, "buy", D(notional), D(0)) for i in range(n)}


def _open_sell(amount: str, market: str = "BTC-EUR") -> dict[str, OpenIntent]:
    return {"open-sell": OpenIntent(market, "sell", D(50), D(amount))}


GO = GateStatus(True, "GO by test")
LONG = {"position": D("0.002")}  # a long BTC position the sell below reduces
SELL = {"side": "sell"}

# (case, proposal changes, context changes, limit changes, the failing guards)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], list[str]]] = [
    ("all clear", {}, {}, {}, []),
    ("kill switch on", {}, {"kill": True}, {}, ["kill_switch"]),
    ("live with the gate closed", {}, {"live": True, "gate": GateStatus(False, "no decision")}, {}, ["live_gate"]),
    ("live with the gate open", {}, {"live": True, "gate": GO}, {}, []),
    ("halted", {}, {"state": "halted"}, {}, ["trading_state"]),
    ("unknown trading state", {}, {"state": "paused"}, {}, ["trading_state"]),
    ("reduce-only without a position", {}, {"state": "reduce-only"}, {}, ["trading_state"]),
    ("reduce-only: buy adds to a long", {}, {"state": "reduce-only", **LONG}, {}, ["trading_state"]),
    ("reduce-only: sell part of a long", SELL, {"state": "reduce-only", **LONG}, {}, []),
    ("reduce-only: sell more than the long", {**SELL, "amount": D("0.003")}, {"state": "reduce-only", **LONG}, {},
     ["trading_state", "no_inventory"]),
    ("reduce-only: sell with nothing held", SELL, {"state": "reduce-only"}, {}, ["trading_state", "no_inventory"]),
    ("sell with nothing held", SELL, {}, {}, ["no_inventory"]),
    ("sell larger than the position", {**SELL, "amount": D("0.003")}, LONG, {}, ["no_inventory"]),
    ("sell exactly the position", {**SELL, "amount": D("0.002")}, LONG, {}, []),
    ("an open sell already holds the inventory", SELL, {**LONG, "open_intents": _open_sell("0.0015")}, {},
     ["no_inventory"]),
    ("an open sell leaves enough for this one", SELL, {**LONG, "open_intents": _open_sell("0.001")}, {}, []),
    ("open sells of another market do not count", SELL, {**LONG, "open_intents": _open_sell("0.002", "ETH-EUR")},
     {}, []),
    ("open buys are no inventory", SELL, {"open_intents": _open(1, "BTC-EUR", "50")}, {}, ["no_inventory"]),
    ("inventory below the market's base minimum", {**SELL, "amount": D("0.0001"), "min_amount": D("0.0003")},
     {"position": D("0.0002")}, {}, ["no_inventory", "order_minimum"]),
    ("inventory exactly at the notional minimum", {**SELL, "amount": D("0.0001"), "notional": D(5)},
     {"position": D("0.0001")}, {"max_notional_per_order": D(250)}, []),
    ("inventory worth less than the notional minimum", {**SELL, "amount": D("0.00009"), "notional": D("4.5")},
     {"position": D("0.00009")}, {}, ["no_inventory", "order_minimum"]),
    ("unreadable position fails a sell closed", SELL, {**LONG, "unreadable": {"position": "bad"}}, {},
     ["no_inventory", "max_exposure_market", "max_exposure_total"]),
    ("book exactly at the staleness limit", {"signal_ts": NOW - 5_000}, {}, {}, []),
    ("book 1 ms too old", {"signal_ts": NOW - 5_001}, {}, {}, ["stale_data"]),
    ("open gap for the market", {}, {"gap_open": True}, {}, ["stale_data"]),
    ("notional at the order limit", {"notional": D(250)}, {}, {}, []),
    ("notional above the order limit", {"notional": D("250.01")}, {}, {}, ["max_notional"]),
    ("market exposure plus order at the limit", {}, {"market_exposure": D(950), "total_exposure": D(950)}, {}, []),
    ("market exposure plus open intents plus order above the limit", {},
     {"market_exposure": D(900), "total_exposure": D(900), "open_intents": _open(1, "BTC-EUR", "60")}, {},
     ["max_exposure_market"]),
    ("open intents of other markets do not count per market", {},
     {"market_exposure": D(900), "total_exposure": D(900), "open_intents": _open(1, "ETH-EUR", "60")}, {}, []),
    ("a reducing order passes a full market", SELL, {"market_exposure": D(990), "total_exposure": D(4990), **LONG},
     {}, []),
    ("total exposure plus order above the limit", {}, {"total_exposure": D(4960)}, {}, ["max_exposure_total"]),
    ("open intents of every market count in the total", {},
     {"total_exposure": D(4900), "open_intents": _open(2, "ETH-EUR", "30")}, {}, ["max_exposure_total"]),
    ("one open intent short of the limit", {}, {"open_intents": _open(19)}, {}, []),
    ("open intents at the limit", {}, {"open_intents": _open(20)}, {}, ["max_open_intents"]),
    ("realised loss exactly at the limit", {}, {"realized_today": D(-250)}, {}, []),
    ("realised loss beyond the limit", {}, {"realized_today": D("-250.01")}, {}, ["daily_loss"]),
    ("loss limit reached, the order reduces", SELL, {"realized_today": D(-400), **LONG}, {}, []),
    ("cooldown not over", {}, {"last_intent_ms": NOW - 29_999}, {}, ["cooldown"]),
    ("cooldown just over", {}, {"last_intent_ms": NOW - 30_000}, {}, []),
    ("cooldown switched off", {}, {"last_intent_ms": NOW}, {"market_cooldown_ms": 0}, []),
    ("amount rounds to nothing", {"amount": D(0), "notional": D(0)}, {}, {}, ["order_minimum"]),
    ("amount below the market minimum", {"min_amount": D("0.01")}, {}, {}, ["order_minimum"]),
    ("notional below the market minimum", {"notional": D("4.99")}, {}, {}, ["order_minimum"]),
    ("unreadable exposure fails closed", {}, {"unreadable": {"exposure": "not a decimal"}}, {},
     ["max_exposure_market", "max_exposure_total"]),
    ("unreadable open intents fail closed", {}, {"unreadable": {"open_intents": "bad JSON"}}, {},
     ["max_exposure_market", "max_exposure_total", "max_open_intents"]),
    ("unreadable realised PnL fails closed", {}, {"unreadable": {"realized_today": "bad"}}, {}, ["daily_loss"]),
    ("unreadable last intent time fails closed", {}, {"unreadable": {"last_intent": "bad"}}, {}, ["cooldown"]),
]


@pytest.mark.parametrize(("proposal", "context", "limits", "failing"),
                         [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_each_guard_rejects_what_it_should_and_lets_the_rest_through(
        proposal: dict[str, Any], context: dict[str, Any], limits: dict[str, Any], failing: list[str]) -> None:
    assert _judge(proposal, context, limits) == failing


# One change per guard that fails that guard and no other.
FAIL_ONLY: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "kill_switch": ({}, {"kill": True}),
    "live_gate": ({}, {"live": True}),
    "trading_state": ({}, {"state": "halted"}),
    "stale_data": ({}, {"gap_open": True}),
    "no_inventory": ({"side": "sell"}, {}),
    "max_notional": ({"notional": D(300)}, {}),
    "max_exposure_market": ({}, {"market_exposure": D(990)}),
    "max_exposure_total": ({}, {"total_exposure": D(4990)}),
    "max_open_intents": ({}, {"open_intents": _open(20)}),
    "daily_loss": ({}, {"realized_today": D(-300)}),
    "cooldown": ({}, {"last_intent_ms": NOW - 1}),
    "order_minimum": ({"amount": D(0)}, {}),
    "drill_signal": ({"drill": True}, {}),
}


def test_every_guard_has_a_single_failure_case() -> None:
    assert list(FAIL_ONLY) == list(GUARD_NAMES)
    for guard, (proposal, context) in FAIL_ONLY.items():
        assert _judge(proposal, context) == [guard]


@pytest.mark.parametrize(("earlier", "later"), list(combinations(GUARD_NAMES, 2)))
def test_with_two_failing_guards_the_first_in_order_is_reported(earlier: str, later: str) -> None:
    proposal = {**FAIL_ONLY[earlier][0], **FAIL_ONLY[later][0]}
    context = {**FAIL_ONLY[earlier][1], **FAIL_ONLY[later][1]}
    outcomes = evaluate(replace(PROPOSAL, **proposal), replace(CONTEXT, **context), LIMITS)
    failed = first_failure(outcomes)
    assert failed is not None and failed.guard == earlier
    assert {o.guard for o in outcomes if not o.passed} == {earlier, later}


def test_a_rejection_names_measured_and_limit_values() -> None:
    outcomes = evaluate(replace(PROPOSAL, notional=D("300.5")), CONTEXT, LIMITS)
    failed = first_failure(outcomes)
    assert failed is not None
    assert failed.to_json() == {"guard": "max_notional", "passed": False, "measured": "300.5", "limit": "250",
                                "reason": "order notional 300.5 EUR above 250 EUR"}
    stale = first_failure(evaluate(replace(PROPOSAL, signal_ts=NOW - 7_000), CONTEXT, LIMITS))
    assert stale is not None and (stale.measured, stale.limit) == (7_000, 5_000)


@pytest.mark.parametrize(("side", "amount", "position", "reduces"), [
    ("sell", "1", "2", True), ("sell", "2", "2", True), ("sell", "3", "2", False), ("sell", "1", "0", False),
    ("sell", "0", "2", False), ("buy", "1", "2", False), ("buy", "1", "0", False),
])
def test_reduces_position(side: str, amount: str, position: str, reduces: bool) -> None:
    assert reduces_position(side, D(amount), D(position)) is reduces


# -- the context from raw Redis replies ---------------------------------------------------------

def _context(**raw: Any) -> Context:
    args: dict[str, Any] = {"now_ms": NOW, "market": "BTC-EUR", "live": False, "kill": None, "state": None,
                            "pnl": [None] * 6, "open_intents": {}, "gap": None, "last_intent": None, "golive": None}
    args.update(raw)
    return context_from_redis(**args)


def test_context_from_an_empty_redis_is_a_clean_slate() -> None:
    ctx = _context()
    assert (ctx.kill, ctx.state, ctx.position, ctx.total_exposure, ctx.last_intent_ms) == (False, "active", 0, 0,
                                                                                           None)
    assert not ctx.unreadable and _judge({}, {}) == []


def test_context_reads_pnl_open_intents_gaps_and_cooldown() -> None:
    ctx = _context(kill="1", state="reduce-only",
                   pnl=["1200.5", "-12.25", utc_date(NOW), "0.01", "740", str(NOW - 900)],
                   open_intents={"a": '{"market":"BTC-EUR","side":"buy","notional":"50","amount":"0.0007","ts":1}',
                                 "b": '{"market":"ETH-EUR","side":"sell","notional":"20.5","amount":"0.01","ts":2}',
                                 "c": '{"market":"BTC-EUR","side":"sell","notional":"60","amount":"0.0008","ts":3}'},
                   gap='{"kind":"nonce","since_ms":1}', last_intent=str(NOW - 10))
    assert ctx.kill and ctx.state == "reduce-only" and ctx.gap_open
    assert (ctx.total_exposure, ctx.realized_today, ctx.position, ctx.market_exposure) == (
        D("1200.5"), D("-12.25"), D("0.01"), D(740))
    assert ctx.open_notional("BTC-EUR") == 110 and ctx.open_notional() == D("130.5")
    assert ctx.open_sells("BTC-EUR") == D("0.0008") and ctx.inventory("BTC-EUR") == D("0.0092")
    assert ctx.last_intent_ms == NOW - 10 and not ctx.unreadable


def test_a_negative_ledger_position_or_an_open_intent_without_amount_is_unreadable() -> None:
    ctx = _context(pnl=["0", "0", utc_date(NOW), "-0.01", "0", str(NOW)],
                   open_intents={"old": '{"market":"BTC-EUR","side":"sell","notional":"50","ts":1}'})
    assert set(ctx.unreadable) == {"position", "open_intents"}
    failed = first_failure(evaluate(replace(PROPOSAL, side="sell"), ctx, LIMITS))
    assert failed is not None and failed.guard == "no_inventory" and "unreadable" in failed.reason


def test_realised_pnl_of_another_day_does_not_count_today() -> None:
    ctx = _context(pnl=["0", "-900", "2020-01-01", None, None, None])
    assert ctx.realized_today == 0


def test_corrupt_inputs_are_marked_unreadable() -> None:
    ctx = _context(pnl=["abc", "NaN", utc_date(NOW), "1", "0", str(NOW)], open_intents={"x": "not json"},
                   last_intent="soon")
    assert set(ctx.unreadable) == {"exposure", "realized_today", "open_intents", "last_intent"}


def test_a_stale_pnl_hash_refuses_new_risk() -> None:
    stale = _context(pnl=["10", "0", utc_date(NOW), "0.1", "10", str(NOW - 60_000)])
    assert set(stale.unreadable) == {"exposure", "realized_today", "position"}
    assert "60 s ago" in stale.unreadable["exposure"]
    failed = first_failure(evaluate(PROPOSAL, stale, LIMITS))
    assert failed is not None and failed.guard == "max_exposure_market" and "unreadable" in failed.reason
    assert not _context(pnl=["10", "0", utc_date(NOW), "0.1", "10", str(NOW - 5_000)]).unreadable


def test_the_live_gate_is_judged_only_in_live_mode() -> None:
    decision = {"decision": "GO", "operator": "test", "valid_until_ms": str(NOW + 60_000)}
    assert _context(live=True, golive=decision).gate.open
    closed = _context(live=True, golive={})
    assert not closed.gate.open and "no go-live decision" in closed.gate.reason
    expired = _context(live=True, golive={**decision, "valid_until_ms": str(NOW - 1)})
    assert not expired.gate.open and "expired" in expired.gate.reason
    assert not _context(live=True, kill="1", golive=decision).gate.open


# -- limits from settings and overrides ---------------------------------------------------------

def test_limits_come_from_settings_with_overrides() -> None:
    settings = Settings.from_env({"MAX_NOTIONAL_PER_ORDER_EUR": "100", "MARKET_COOLDOWN_MS": "5000"})
    limits = Limits.from_settings(settings, {"max_exposure_total": "1234.5", "max_open_intents": 3,
                                             "market_cooldown_ms": D(0), "max_daily_loss": None})
    assert limits == Limits(max_notional_per_order=D(100), max_exposure_per_market=D(1000),
                            max_exposure_total=D("1234.5"), max_open_intents=3, max_daily_loss=D(250),
                            stale_book_ms=5_000, market_cooldown_ms=0)


@pytest.mark.parametrize(("name", "value", "message"), [
    ("max_notional_per_order", "-5", "positive"),
    ("max_notional_per_order", "abc", "not a decimal"),
    ("max_notional_per_order", 2.5, "float"),
    ("max_open_intents", "2.5", "whole number"),
    ("max_open_intents", 0, "positive"),
    ("market_cooldown_ms", -1, ">= 0"),
    ("max_leverage", 3, "not a risk limit"),
])
def test_bad_limit_overrides_fail_naming_the_limit(name: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=name) as raised:
        Limits.from_settings(Settings(), {name: value})
    assert message in str(raised.value)


# -- sizing and signal checks (trading/trading_core.py, pure) -----------------------------------

BTC_RULES = market_rules_from_wire({
    "market": "BTC-EUR", "status": "trading", "base": "BTC", "quote": "EUR", "pricePrecision": None,
    "minOrderInBaseAsset": "0.00006607", "minOrderInQuoteAsset": "5.00", "maxOrderInBaseAsset": "1000000000",
    "maxOrderInQuoteAsset": "1000000000", "quantityDecimals": 8, "notionalDecimals": 2, "tickSize": "1.00"})


def _signal(**changes: Any) -> Signal:
    base = Signal(signal_id="s1", market="BTC-EUR", side="buy", ref_price=D("74096.5"), spread_bps=D("1.35"),
                  ts=NOW, strategy="baseline")
    return replace(base, **changes)


def test_market_rules_parse_a_get_markets_row() -> None:
    assert (BTC_RULES.tick_size, BTC_RULES.quantity_decimals, BTC_RULES.min_order_quote) == (D(1), 8, D(5))


@pytest.mark.parametrize(("side", "expected_price"), [("buy", D(74175)), ("sell", D(74018))])
def test_a_signal_becomes_a_marketable_limit_within_the_slippage_bound(side: str, expected_price: Decimal) -> None:
    plan = size_order(_signal(side=side), BTC_RULES, order_notional=D(50), slippage_bps=D(10))
    # Sized at the worst price: a buy at its limit 74175 (50 / 74175 = 0.000674081.. down to 8 decimals),
    # a sell at the ref price 74096.5 (0.000674796..); valued at that same price.
    worst = max(expected_price, D("74096.5"))
    assert plan.amount == {"buy": D("0.00067408"), "sell": D("0.00067479")}[side]
    assert plan.notional == plan.amount * worst
    bound = D("74096.5") * (1 + (D("0.675") + 10) / 10_000 * (1 if side == "buy" else -1))
    assert plan.price == expected_price
    assert (plan.price <= bound) if side == "buy" else (plan.price >= bound)  # never beyond the bound
    assert bound - 1 < plan.price < bound + 1  # and on the tick grid next to it
    assert plan.notional <= 50


def test_a_sell_is_sized_at_most_at_the_inventory() -> None:
    plan = size_order(_signal(side="sell"), BTC_RULES, order_notional=D(50), slippage_bps=D(10),
                      max_amount=D("0.0002"))
    assert plan.amount == D("0.0002")


def test_without_market_rules_precision_falls_back_to_significant_digits() -> None:
    assert round_amount(D("0.000674796"), None) == D("0.00067479")
    assert round_amount(D("37.0004321"), None) == D("37.000")
    assert round_amount(D("0.0000000012345"), None) == D(0)  # never more than 8 decimals
    assert round_price(D("74177.123"), "buy", None) == D(74177)
    assert round_price(D("1.3513456"), "sell", None) == D("1.3514")
    xrp = replace(BTC_RULES, market="XRP-EUR", tick_size=D("0.00001"), quantity_decimals=6)
    assert round_amount(D("37.00049999"), xrp) == D("37.000499")
    assert round_price(D("1.351234"), "buy", xrp) == D("1.35123")


GOOD = {"v": "1", "ts": str(NOW), "signal_id": "s1", "market": "BTC-EUR", "side": "buy", "strength": "0.5",
        "reason": "spread", "ref_price": "74096.5", "spread_bps": "1.35", "volatility": "3", "strategy": "baseline"}
KNOWN = {"BTC-EUR": BTC_RULES}


def test_a_good_signal_parses() -> None:
    assert parse_signal(GOOD, KNOWN) == _signal()
    assert parse_signal({**GOOD, "market": "DOGE-EUR"}, {}).market == "DOGE-EUR"  # no rules: names only


@pytest.mark.parametrize(("changes", "reason"), [
    ({"signal_id": None}, "missing signal_id"),
    ({"ref_price": None}, "missing ref_price"),
    ({"ref_price": "abc"}, "ref_price is not a decimal"),
    ({"ref_price": "NaN"}, "must be finite"),
    ({"ref_price": "-1"}, "ref_price must be positive"),
    ({"spread_bps": "-1"}, "spread_bps must be in"),
    ({"market": "btc-eur"}, "not a market name"),
    ({"market": "DOGE-EUR"}, "unknown market 'DOGE-EUR'"),
    ({"side": "hold"}, "side must be buy or sell"),
    ({"ts": None}, "lacks 'v' or 'ts'"),
    ({"v": "9"}, "schema version 9"),
])
def test_bad_signals_are_rejected_with_the_reason(changes: dict[str, Any], reason: str) -> None:
    fields = {k: v for k, v in {**GOOD, **changes}.items() if v is not None}
    with pytest.raises(RejectEntry, match=reason.replace("(", r"\(")):
        parse_signal(fields, KNOWN)


def test_the_widest_signal_spread_still_leaves_a_positive_sell_price() -> None:
    plan = size_order(_signal(side="sell", spread_bps=D(9_999)), BTC_RULES, order_notional=D(50),
                      slippage_bps=MAX_SLIPPAGE_BPS)
    assert plan.price > 0
