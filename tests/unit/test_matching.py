"""Example tests of the matching engine: order types, TIF, STP, updates, wire shapes vs real orders."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest

from tests.fixtures import ccxt_responses
from trading.decimals import ceil_to
from trading.exchange.errors import (
    BitvavoError,
    InsufficientBalanceError,
    InvalidRequestError,
    MarketUnavailableError,
    OrderNotFoundError,
)
from trading.matching import (
    FeeRates,
    LevelChange,
    MarketRules,
    MatchingEngine,
    OrderRequest,
    OrderUpdate,
)

D = Decimal
BTC_EUR = MarketRules(market="BTC-EUR", base="BTC", quote="EUR", tick_size=D("1"), quantity_decimals=8,
                      notional_decimals=2, min_order_base=D("0.00001"), min_order_quote=D("5"))
ETH_EUR = MarketRules(market="ETH-EUR", base="ETH", quote="EUR", tick_size=D("0.01"), quantity_decimals=4,
                      notional_decimals=2, min_order_base=D("0.001"), min_order_quote=D("5"),
                      max_order_base=D("100"), max_open_orders=2)
CATEGORY_A = FeeRates(maker=D("0.0015"), taker=D("0.0025"))
NO_FEES = FeeRates(maker=D("0"), taker=D("0"))
EUR0, BTC0 = D("100000"), D("10")  # alice's and bob's starting balances


class Clock:
    def __init__(self, now: int = 1_700_000_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def counter_ids(prefix: str = "id") -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"{prefix}-{next(counter)}"


def scripted_ids(*ids: str) -> Callable[[], str]:
    """The given ids first (as in a real capture), then generated ones."""
    rest = counter_ids()
    it: Iterator[str] = iter(ids)
    return lambda: next(it, None) or rest()


def make_engine(clock: Clock | None = None, ids: Callable[[], str] | None = None,
                **kwargs: Any) -> MatchingEngine:
    engine = MatchingEngine([BTC_EUR, ETH_EUR], clock=clock or Clock(), id_factory=ids or counter_ids(),
                            **kwargs)
    engine.open_account("alice", {"EUR": EUR0, "BTC": BTC0, "ETH": D("10")}, CATEGORY_A)
    engine.open_account("bob", {"EUR": EUR0, "BTC": BTC0, "ETH": D("10")}, CATEGORY_A)
    engine.open_account("mm", {}, NO_FEES, unlimited=True)
    return engine


@pytest.fixture
def engine() -> MatchingEngine:
    return make_engine()


def limit(side: str, amount: str, price: str, market: str = "BTC-EUR", **kwargs: Any) -> OrderRequest:
    return OrderRequest(market=market, side=side, order_type="limit", amount=D(amount),  # type: ignore[arg-type]
                        price=D(price), **kwargs)


def market(side: str, amount: str | None = None, amount_quote: str | None = None,
           market: str = "BTC-EUR", **kwargs: Any) -> OrderRequest:
    return OrderRequest(market=market, side=side, order_type="market",  # type: ignore[arg-type]
                        amount=None if amount is None else D(amount),
                        amount_quote=None if amount_quote is None else D(amount_quote), **kwargs)


def total(engine: MatchingEngine, accounts: tuple[str, ...], symbol: str) -> Decimal:
    balances = [engine.balances(a)[symbol] for a in accounts]
    return sum((b.available + b.in_order for b in balances), D(0)) + engine.collected_fees()[symbol]


def in_order(engine: MatchingEngine, account: str, symbol: str) -> Decimal:
    return engine.balances(account)[symbol].in_order


def available(engine: MatchingEngine, account: str, symbol: str) -> Decimal:
    return engine.balances(account)[symbol].available


def as_real(response: dict[str, Any]) -> dict[str, Any]:
    """ccxt's capture stringifies integers; restore them as the spec (§5.4) says."""
    wire = copy.deepcopy(response)
    wire["created"], wire["updated"] = int(wire["created"]), int(wire["updated"])
    for fill in wire["fills"]:
        fill["timestamp"] = int(fill["timestamp"])
    return wire


def expect_error(code: int, call: Callable[[], object], message: str | None = None) -> BitvavoError:
    with pytest.raises(BitvavoError) as caught:
        call()
    assert caught.value.error_code == code, caught.value
    if message is not None:
        assert caught.value.message == message
    return caught.value


# ---------------------------------------------------------------- wire shapes vs real orders

def test_limit_buy_reproduces_real_create_order_response() -> None:
    real = as_real(ccxt_responses()["createOrder"])
    engine = make_engine(Clock(real["created"]), scripted_ids(real["orderId"]))
    result = engine.place("alice", limit("buy", "0.0003", "30000", client_order_id=real["clientOrderId"]))
    assert result.order.to_wire() == real
    assert engine.balances("alice")["EUR"].in_order == D("9.03")
    assert engine.balances("alice")["EUR"].available == EUR0 - D("9.03")
    assert result.level_changes == [LevelChange("buy", D("30000"), D("0.0003"))]


def test_price_update_reproduces_real_edit_order_response() -> None:
    real = as_real(ccxt_responses()["editOrder"])
    clock = Clock(real["created"])
    engine = make_engine(clock, scripted_ids(real["orderId"]))
    engine.place("alice", limit("buy", "0.0003", "30000"))
    clock.now = real["updated"]
    result = engine.update("alice", "BTC-EUR", OrderUpdate(price=D("31000")), order_id=real["orderId"])
    assert result.order.to_wire() == real
    assert in_order(engine, "alice", "EUR") == D("9.33")
    assert available(engine, "alice", "EUR") == EUR0 - D("9.33")
    assert result.level_changes == [LevelChange("buy", D("30000"), D("0")),
                                    LevelChange("buy", D("31000"), D("0.0003"))]


@pytest.mark.parametrize("index", [0, 2])
def test_market_sell_reproduces_real_filled_order(index: int) -> None:
    real = as_real(ccxt_responses()["fetchOrders"][index])
    real_fill = real["fills"][0]
    clock = Clock(real["created"])
    engine = make_engine(clock, scripted_ids("mm-order", real["orderId"], real_fill["id"]))
    engine.set_liquidity_level("mm", "BTC-EUR", "buy", D(real_fill["price"]), D("1"))
    result = engine.place("alice", market("sell", real["amount"], client_order_id=real["clientOrderId"]))
    # The engine stamps a fill with the call's clock reading; the real fill came 10 ms later.
    real_fill["timestamp"] = real["created"]
    assert result.order.to_wire() == real
    assert [t.trade_id for t in result.trades] == [real_fill["id"]]
    assert result.trades[0].side == "sell"
    net = D(real["filledAmountQuote"]) - D(real["feePaid"])
    assert available(engine, "alice", "EUR") == EUR0 + net
    assert available(engine, "alice", "BTC") == BTC0 - D(real["amount"])
    # A zero maker rate still rounds the buyer's debit up to the cent (spec §5.6).
    (maker_fill,) = result.maker_fills
    gross = D(real["filledAmountQuote"])
    assert maker_fill.fee == gross.quantize(D("0.01"), rounding="ROUND_CEILING") - gross
    assert engine.collected_fees()["EUR"] == D(real["feePaid"]) + maker_fill.fee


@pytest.mark.parametrize(("side", "amount", "price", "fee", "quote_change"), [
    ("sell", "0.00020002", "34469", "0.02448938", "6.87"),   # fetchOrders[0]
    ("buy", "0.0002", "34488", "0.0224", "-6.92"),           # fetchOrders[1] (a triggered stopLoss)
    ("sell", "0.0002", "34464", "0.0228", "6.87"),           # fetchOrders[2]
])
def test_taker_fees_match_the_real_fills(side: str, amount: str, price: str, fee: str,
                                         quote_change: str) -> None:
    engine = make_engine()
    engine.set_liquidity_level("mm", "BTC-EUR", "sell" if side == "buy" else "buy", D(price), D("1"))
    result = engine.place("alice", market(side, amount))
    (fill,) = result.fills
    assert fill.fee == D(fee) and fill.fee_currency == "EUR" and fill.taker
    assert result.order.status == "filled"
    assert available(engine, "alice", "EUR") - EUR0 == D(quote_change)
    assert in_order(engine, "alice", "EUR") == 0 and in_order(engine, "alice", "BTC") == 0


def test_fill_wire_shape() -> None:
    engine = make_engine(Clock(1_700_130_652_275), scripted_ids("o1", "o2", "trade-1"))
    engine.set_liquidity_level("mm", "BTC-EUR", "buy", D("34469"), D("1"))
    (fill,) = engine.place("alice", market("sell", "0.00020002")).fills
    assert fill.to_wire() == {"id": "trade-1", "timestamp": 1_700_130_652_275, "amount": "0.00020002",
                              "price": "34469", "taker": True, "fee": "0.02448938", "feeCurrency": "EUR",
                              "settled": True}


def test_amount_quote_order_wire_fields(engine: MatchingEngine) -> None:
    engine.set_liquidity_level("mm", "BTC-EUR", "sell", D("50000"), D("1"))
    wire = engine.place("alice", market("buy", amount_quote="10", operator_id=543462)).order.to_wire()
    assert "amount" not in wire and "amountRemaining" not in wire
    assert wire["amountQuote"] == "10"
    assert D(wire["amountQuoteRemaining"]) >= 0
    assert "price" not in wire and "timeInForce" not in wire and "postOnly" not in wire
    assert wire["visible"] is False and wire["disableMarketProtection"] is False
    assert wire["operatorId"] == 543462
    assert "clientOrderId" not in wire


def test_limit_order_wire_omits_market_only_fields(engine: MatchingEngine) -> None:
    wire = engine.place("alice", limit("sell", "0.1", "60000", time_in_force="GTC", post_only=True)).order.to_wire()
    assert "disableMarketProtection" not in wire and "amountQuote" not in wire and "operatorId" not in wire
    assert wire["postOnly"] is True and wire["visible"] is True and wire["onHoldCurrency"] == "BTC"
    assert wire["onHold"] == "0.1"


# ---------------------------------------------------------------- order types and time in force

def test_limit_buy_sweeps_levels_then_rests_the_remainder(engine: MatchingEngine) -> None:
    engine.place("bob", limit("sell", "0.1", "50000"))
    engine.place("bob", limit("sell", "0.1", "50001"))
    engine.place("bob", limit("sell", "0.1", "50010"))
    result = engine.place("alice", limit("buy", "0.25", "50005"))
    order = result.order
    assert order.status == "partiallyFilled"
    assert [(f.amount, f.price, f.taker) for f in result.fills] == [
        (D("0.1"), D("50000"), True), (D("0.1"), D("50001"), True)]
    assert [(f.account_id, f.taker) for f in result.maker_fills] == [("bob", False), ("bob", False)]
    assert [t.side for t in result.trades] == ["buy", "buy"]
    assert [o.status for o in result.touched_orders] == ["filled", "filled"]
    assert result.level_changes == [LevelChange("sell", D("50000"), D("0")),
                                    LevelChange("sell", D("50001"), D("0")),
                                    LevelChange("buy", D("50005"), D("0.05"))]
    assert order.amount_remaining == D("0.05") and order.filled_amount == D("0.2")
    assert order.filled_amount_quote == D("10000.1")
    # Cumulative rounding: the order pays ceil2(10000.1*1.0025) = 10025.11 in all, split as
    # ceil2(5000*1.0025) = 5012.50 then 10025.11 - 5012.50 = 5012.61.
    assert [f.fee for f in result.fills] == [D("12.50"), D("12.51")]
    assert order.fee_paid == D("25.01")
    # The remaining hold is what the rest can still cost after that rounding:
    # ceil2(10000.1*1.0025 + 0.05*50005*1.0025) - 10025.11 = 12631.61 - 10025.11.
    assert order.on_hold == D("2506.50")
    assert engine.best_bid("BTC-EUR") == (D("50005"), D("0.05"))
    assert engine.best_ask("BTC-EUR") == (D("50010"), D("0.1"))


def test_maker_fee_and_partial_maker_fill(engine: MatchingEngine) -> None:
    resting = engine.place("alice", limit("buy", "0.2", "40000")).order
    assert resting.on_hold == D("8020.00")
    result = engine.place("bob", market("sell", "0.05"))
    (maker_fill,) = result.maker_fills
    assert not maker_fill.taker and maker_fill.fee == D("3.00")  # ceil2(2000*1.0015) - 2000
    assert resting.status == "partiallyFilled"
    assert resting.on_hold == D("6015.00")  # ceil2(0.15*40000*1.0025)
    assert in_order(engine, "alice", "EUR") == D("6015.00")
    # Held 8020.00, paid 2003.00 from the hold, 2.00 of excess hold returned.
    assert available(engine, "alice", "EUR") == EUR0 - D("8018")
    assert result.touched_orders == [resting]


def test_ioc_remainder_is_canceled_and_hold_released(engine: MatchingEngine) -> None:
    engine.place("bob", limit("sell", "0.01", "50000"))
    result = engine.place("alice", limit("buy", "0.02", "50000", time_in_force="IOC"))
    assert result.order.status == "canceledIOC"
    assert result.order.filled_amount == D("0.01") and result.order.amount_remaining == D("0.01")
    assert result.order.on_hold == 0 and in_order(engine, "alice", "EUR") == 0
    assert engine.best_bid("BTC-EUR") is None
    assert available(engine, "alice", "EUR") == EUR0 - D("501.25")


def test_fok_that_cannot_fill_is_canceled_without_fills(engine: MatchingEngine) -> None:
    engine.place("bob", limit("sell", "0.01", "50000"))
    engine.place("bob", limit("sell", "0.01", "50002"))
    before = engine.depth("BTC-EUR")
    result = engine.place("alice", limit("buy", "0.02", "50001", time_in_force="FOK"))
    assert result.order.status == "canceledFOK"
    assert result.fills == [] and result.trades == [] and result.level_changes == []
    assert engine.depth("BTC-EUR") == before
    assert available(engine, "alice", "EUR") == EUR0 and in_order(engine, "alice", "EUR") == 0


def test_fok_that_can_fill_fills_completely(engine: MatchingEngine) -> None:
    engine.place("bob", limit("sell", "0.01", "50000"))
    engine.place("bob", limit("sell", "0.01", "50002"))
    result = engine.place("alice", limit("buy", "0.015", "50002", time_in_force="FOK"))
    assert result.order.status == "filled"
    assert sum(f.amount for f in result.fills) == D("0.015")
    assert engine.best_ask("BTC-EUR") == (D("50002"), D("0.005"))


def test_fok_that_would_self_trade_is_canceled(engine: MatchingEngine) -> None:
    engine.place("alice", limit("sell", "0.01", "50000"))
    engine.place("bob", limit("sell", "0.05", "50001"))
    result = engine.place("alice", limit("buy", "0.02", "50001", time_in_force="FOK"))
    assert result.order.status == "canceledFOK" and result.fills == []


def test_post_only_that_would_cross_is_canceled(engine: MatchingEngine) -> None:
    engine.place("bob", limit("sell", "0.01", "50000"))
    result = engine.place("alice", limit("buy", "0.01", "50000", post_only=True))
    assert result.order.status == "canceledPostOnly" and result.fills == []
    assert in_order(engine, "alice", "EUR") == 0
    rests = engine.place("alice", limit("buy", "0.01", "49999", post_only=True))
    assert rests.order.status == "new" and engine.best_bid("BTC-EUR") == (D("49999"), D("0.01"))


def test_market_buy_by_amount_exhausting_the_book(engine: MatchingEngine) -> None:
    engine.place("bob", limit("sell", "0.01", "50000"))
    result = engine.place("alice", market("buy", "0.03"))
    assert result.order.status == "canceledMarketProtection"
    assert result.order.filled_amount == D("0.01") and result.order.amount_remaining == D("0.02")
    assert in_order(engine, "alice", "EUR") == 0
    assert available(engine, "alice", "EUR") == EUR0 - D("501.25")
    empty = engine.place("alice", market("buy", "0.01"))
    assert empty.order.status == "canceledMarketProtection" and empty.fills == []


def test_market_buy_by_amount_checks_balance_against_the_book_walk(engine: MatchingEngine) -> None:
    engine.open_account("carol", {"EUR": D("1000")}, CATEGORY_A)
    engine.place("bob", limit("sell", "0.5", "50000"))
    expect_error(216, lambda: engine.place("carol", market("buy", "0.02")))  # 1002.50 with fees
    ok = engine.place("carol", market("buy", "0.0199"))
    assert ok.order.status == "filled" and available(engine, "carol", "EUR") == D("1000") - D("997.49")


def test_market_buy_by_amount_quote_spends_at_most_the_budget(engine: MatchingEngine) -> None:
    engine.place("bob", limit("sell", "0.0001", "50000"))
    engine.place("bob", limit("sell", "1", "50100"))
    result = engine.place("alice", market("buy", amount_quote="100"))
    order = result.order
    assert order.status == "filled"
    spent = EUR0 - available(engine, "alice", "EUR")
    assert spent == order.filled_amount_quote + order.fee_paid
    assert spent <= D("100") and order.amount_quote_remaining == D("100") - spent
    # Dust only: not enough budget left for one more satoshi at 50100 incl. fee.
    assert order.amount_quote_remaining is not None
    assert order.amount_quote_remaining < D("50100") * D("0.00000001") * D("1.0025") + D("0.01")
    assert in_order(engine, "alice", "EUR") == 0
    assert available(engine, "alice", "BTC") == BTC0 + order.filled_amount


def test_market_sell_by_amount_quote(engine: MatchingEngine) -> None:
    engine.place("bob", limit("buy", "1", "40000"))
    result = engine.place("alice", market("sell", amount_quote="100"))
    order = result.order
    assert order.status == "filled" and order.filled_amount == D("0.0025")
    assert order.filled_amount_quote == D("100") and order.amount_quote_remaining == 0
    assert available(engine, "alice", "EUR") == EUR0 + D("99.75")
    assert in_order(engine, "alice", "BTC") == 0


def test_market_sell_by_amount_quote_needs_the_base(engine: MatchingEngine) -> None:
    engine.place("bob", limit("buy", "100", "10"))
    expect_error(216, lambda: engine.place("alice", market("sell", amount_quote="200")))  # 20 BTC


# ---------------------------------------------------------------- self-trade prevention

def test_stp_decrement_and_cancel_with_bigger_taker(engine: MatchingEngine) -> None:
    own = engine.place("alice", limit("sell", "0.01", "50000")).order
    engine.place("bob", limit("sell", "0.05", "50001"))
    result = engine.place("alice", limit("buy", "0.03", "50001"))
    assert own.status == "canceledSelfTradePrevention"
    order = result.order
    # Decremented by the 0.01 overlap, then 0.02 filled against bob.
    assert order.status == "filled" and order.filled_amount == D("0.02")
    assert [f.price for f in result.fills] == [D("50001")]
    assert result.touched_orders[0] is own
    assert in_order(engine, "alice", "BTC") == 0 and in_order(engine, "alice", "EUR") == 0


def test_stp_decrement_and_cancel_with_smaller_taker(engine: MatchingEngine) -> None:
    own = engine.place("alice", limit("sell", "0.05", "50000")).order
    result = engine.place("alice", limit("buy", "0.02", "50000"))
    assert result.order.status == "canceledSelfTradePrevention" and result.fills == []
    assert own.status == "new" and own.amount_remaining == D("0.03") and own.on_hold == D("0.03")
    assert engine.best_ask("BTC-EUR") == (D("50000"), D("0.03"))
    assert in_order(engine, "alice", "BTC") == D("0.03") and in_order(engine, "alice", "EUR") == 0
    assert result.level_changes == [LevelChange("sell", D("50000"), D("0.03"))]


@pytest.mark.parametrize(("mode", "taker_status", "maker_status", "fills"), [
    ("cancelOldest", "filled", "canceledSelfTradePrevention", 1),
    ("cancelNewest", "canceledSelfTradePrevention", "new", 0),
    ("cancelBoth", "canceledSelfTradePrevention", "canceledSelfTradePrevention", 0),
])
def test_stp_modes(engine: MatchingEngine, mode: str, taker_status: str, maker_status: str,
                   fills: int) -> None:
    own = engine.place("alice", limit("sell", "0.01", "50000")).order
    engine.place("bob", limit("sell", "0.01", "50001"))
    result = engine.place("alice", limit("buy", "0.01", "50001", self_trade_prevention=mode))
    assert result.order.status == taker_status
    assert own.status == maker_status
    assert len(result.fills) == fills
    assert all(f.account_id != "alice" for f in result.maker_fills)
    expected_held = D("0.01") if maker_status == "new" else D(0)
    assert in_order(engine, "alice", "BTC") == expected_held and in_order(engine, "alice", "EUR") == 0


# ---------------------------------------------------------------- update

def test_update_errors(engine: MatchingEngine) -> None:
    engine.place("bob", limit("sell", "1", "50000"))
    filled = engine.place("alice", market("buy", "0.001")).order
    expect_error(234, lambda: engine.update("alice", "BTC-EUR", OrderUpdate(amount=D("1")),
                                            order_id=filled.order_id))
    done = engine.place("alice", limit("buy", "0.001", "50000")).order
    assert done.status == "filled"
    expect_error(233, lambda: engine.update("alice", "BTC-EUR", OrderUpdate(price=D("49000")),
                                            order_id=done.order_id))
    live = engine.place("alice", limit("buy", "0.001", "49000")).order
    expect_error(232, lambda: engine.update("alice", "BTC-EUR", OrderUpdate(price=D("49000")),
                                            order_id=live.order_id))
    expect_error(232, lambda: engine.update("alice", "BTC-EUR", OrderUpdate(), order_id=live.order_id))
    expect_error(236, lambda: engine.update("alice", "BTC-EUR",
                                            OrderUpdate(amount=D("1"), amount_remaining=D("1")),
                                            order_id=live.order_id))
    expect_error(240, lambda: engine.update("alice", "BTC-EUR", OrderUpdate(price=D("1")),
                                            order_id="nope"))
    expect_error(240, lambda: engine.update("bob", "BTC-EUR", OrderUpdate(price=D("48000")),
                                            order_id=live.order_id))
    expect_error(422, lambda: engine.update("alice", "BTC-EUR", OrderUpdate(price=D("48000.5")),
                                            order_id=live.order_id))
    expect_error(216, lambda: engine.update("alice", "BTC-EUR", OrderUpdate(amount=D("3")),
                                            order_id=live.order_id))


def test_update_smaller_keeps_priority_bigger_loses_it(engine: MatchingEngine) -> None:
    first = engine.place("alice", limit("sell", "0.02", "50000")).order
    engine.place("bob", limit("sell", "0.02", "50000"))
    clock_before = first.updated
    smaller = engine.update("alice", "BTC-EUR", OrderUpdate(amount=D("0.01")), order_id=first.order_id)
    assert smaller.level_changes == [LevelChange("sell", D("50000"), D("0.03"))]
    assert first.on_hold == D("0.01") and in_order(engine, "alice", "BTC") == D("0.01")
    assert first.created == clock_before
    taker = engine.place("mm", market("buy", "0.01"))
    assert taker.maker_fills[0].account_id == "alice"

    second = engine.place("alice", limit("sell", "0.02", "50000")).order
    engine.update("alice", "BTC-EUR", OrderUpdate(amount_remaining=D("0.03")), order_id=second.order_id)
    taker = engine.place("mm", market("buy", "0.02"))
    assert [f.account_id for f in taker.maker_fills] == ["bob"]
    assert second.amount == D("0.03") and second.amount_remaining == D("0.03")


def test_update_partially_filled_amount_keeps_what_was_filled(engine: MatchingEngine) -> None:
    order = engine.place("alice", limit("sell", "0.05", "50000")).order
    engine.place("bob", market("buy", "0.02"))
    engine.update("alice", "BTC-EUR", OrderUpdate(amount=D("0.04")), order_id=order.order_id)
    assert order.amount_remaining == D("0.02") and order.filled_amount == D("0.02")
    assert order.status == "partiallyFilled" and order.on_hold == D("0.02")
    expect_error(205, lambda: engine.update("alice", "BTC-EUR", OrderUpdate(amount=D("0.02")),
                                            order_id=order.order_id))


def test_update_that_crosses_trades(engine: MatchingEngine) -> None:
    clock = Clock(1000)
    engine = make_engine(clock)
    engine.place("bob", limit("sell", "0.01", "50000"))
    order = engine.place("alice", limit("buy", "0.02", "49000", client_order_id="c1")).order
    clock.now = 2000
    result = engine.update("alice", "BTC-EUR", OrderUpdate(price=D("50000")), client_order_id="c1")
    assert result.order is order and order.status == "partiallyFilled"
    assert order.created == 1000 and order.updated == 2000
    assert [f.price for f in result.fills] == [D("50000")]
    assert result.level_changes == [LevelChange("buy", D("49000"), D("0")),
                                    LevelChange("sell", D("50000"), D("0")),
                                    LevelChange("buy", D("50000"), D("0.01"))]
    assert order.on_hold == D("501.25") and in_order(engine, "alice", "EUR") == D("501.25")


def test_update_to_post_only_crossing_is_canceled(engine: MatchingEngine) -> None:
    engine.place("bob", limit("sell", "0.01", "50000"))
    order = engine.place("alice", limit("buy", "0.01", "49000")).order
    result = engine.update("alice", "BTC-EUR", OrderUpdate(price=D("50000"), post_only=True),
                           order_id=order.order_id)
    assert result.order.status == "canceledPostOnly" and result.fills == []
    assert in_order(engine, "alice", "EUR") == 0 and available(engine, "alice", "EUR") == EUR0


# ---------------------------------------------------------------- cancel, queries

def test_cancel_releases_hold_and_removes_level(engine: MatchingEngine) -> None:
    order = engine.place("alice", limit("buy", "0.01", "40000", client_order_id="c1")).order
    result = engine.cancel("alice", "BTC-EUR", client_order_id="c1")
    assert result.order.status == "canceled" and order.on_hold == 0
    assert result.level_changes == [LevelChange("buy", D("40000"), D("0"))]
    assert engine.balances("alice")["EUR"].available == EUR0
    assert engine.depth("BTC-EUR") == ([], [])
    expect_error(240, lambda: engine.cancel("alice", "BTC-EUR", order_id=order.order_id))
    error = expect_error(240, lambda: engine.cancel("alice", "BTC-EUR", order_id="unknown"))
    assert isinstance(error, OrderNotFoundError)
    expect_error(240, lambda: engine.get_order("alice", "ETH-EUR", order_id=order.order_id))
    expect_error(203, lambda: engine.cancel("alice", "BTC-EUR"))


def test_partially_filled_buy_then_cancel_leaves_nothing_on_hold(engine: MatchingEngine) -> None:
    order = engine.place("alice", limit("buy", "0.0009", "30000")).order
    for _ in range(3):
        engine.place("bob", market("sell", "0.00021"))  # 6.30 EUR each: above the 5 EUR minimum
    engine.cancel("alice", "BTC-EUR", order_id=order.order_id)
    assert in_order(engine, "alice", "EUR") == 0 and order.on_hold == 0
    for symbol in ("EUR", "BTC"):
        assert total(engine, ("alice", "bob", "mm"), symbol) == {"EUR": 2 * EUR0, "BTC": 2 * BTC0}[symbol]


def test_cancel_all(engine: MatchingEngine) -> None:
    engine.place("alice", limit("buy", "0.01", "40000"))
    engine.place("alice", limit("sell", "0.1", "3000", market="ETH-EUR"))
    engine.place("bob", limit("buy", "0.01", "40000"))
    results = engine.cancel_all("alice")
    assert sorted(r.order.market for r in results) == ["BTC-EUR", "ETH-EUR"]
    assert all(r.order.status == "canceled" for r in results)
    assert engine.open_orders("alice") == []
    assert engine.best_bid("BTC-EUR") == (D("40000"), D("0.01"))
    assert engine.balances("alice")["ETH"].in_order == 0


def test_queries_newest_first_and_client_order_id_lookup() -> None:
    clock = Clock(1)
    engine = make_engine(clock)
    engine.place("bob", limit("sell", "1", "50000"))
    clock.now = 2
    first = engine.place("alice", limit("buy", "0.001", "40000", client_order_id="a")).order
    clock.now = 3
    second = engine.place("alice", market("buy", "0.001", client_order_id="b")).order
    assert engine.orders("alice", "BTC-EUR") == [second, first]
    assert engine.open_orders("alice", "BTC-EUR") == [first]
    assert engine.get_order("alice", "BTC-EUR", client_order_id="b") is second
    assert engine.account_fills("alice", "BTC-EUR") == second.fills
    assert engine.orders("alice", "ETH-EUR") == [] and engine.account_fills("bob", "ETH-EUR") == []


def test_client_order_id_unique_among_open_orders(engine: MatchingEngine) -> None:
    first = engine.place("alice", limit("buy", "0.001", "40000", client_order_id="c")).order
    expect_error(220, lambda: engine.place("alice", limit("buy", "0.001", "40000", client_order_id="c")))
    engine.cancel("alice", "BTC-EUR", order_id=first.order_id)
    again = engine.place("alice", limit("buy", "0.001", "40000", client_order_id="c")).order
    assert engine.get_order("alice", "BTC-EUR", client_order_id="c") is again
    assert engine.get_order("alice", "BTC-EUR", order_id=first.order_id) is first


def test_history_limit_prunes_closed_orders_only() -> None:
    engine = make_engine(history_limit=2)
    kept = engine.place("alice", limit("buy", "0.001", "40000")).order
    closed = [engine.place("alice", limit("buy", "0.001", "40000", time_in_force="IOC")).order
              for _ in range(3)]
    assert engine.orders("alice", "BTC-EUR") == [closed[2], closed[1], kept]
    expect_error(240, lambda: engine.get_order("alice", "BTC-EUR", order_id=closed[0].order_id))


def test_unknown_account_raises_key_error(engine: MatchingEngine) -> None:
    with pytest.raises(KeyError):
        engine.balances("nobody")
    with pytest.raises(KeyError):
        engine.place("nobody", limit("buy", "0.001", "40000"))
    with pytest.raises(ValueError, match="already exists"):
        engine.open_account("alice", {}, NO_FEES)


def test_depth_limit_and_order(engine: MatchingEngine) -> None:
    for price in ("100", "300", "200"):
        engine.set_liquidity_level("mm", "BTC-EUR", "buy", D(price), D("1"))
    for price in ("500", "400", "600"):
        engine.set_liquidity_level("mm", "BTC-EUR", "sell", D(price), D("2"))
    bids, asks = engine.depth("BTC-EUR", 2)
    assert bids == [(D("300"), D("1")), (D("200"), D("1"))]
    assert asks == [(D("400"), D("2")), (D("500"), D("2"))]
    assert len(engine.depth("BTC-EUR")[0]) == 3
    assert engine.best_bid("BTC-EUR") == (D("300"), D("1"))
    assert engine.best_ask("ETH-EUR") is None


def test_deterministic_given_clock_and_ids() -> None:
    def run() -> list[dict[str, Any]]:
        engine = make_engine(Clock(5), counter_ids("x"))
        engine.set_liquidity_level("mm", "BTC-EUR", "sell", D("50000"), D("0.3"))
        a = engine.place("alice", limit("buy", "0.2", "50000")).order
        b = engine.place("bob", market("buy", amount_quote="7000")).order
        return [a.to_wire(), b.to_wire()]

    assert run() == run()


# ---------------------------------------------------------------- validation (spec §5.1 order)

@pytest.mark.parametrize(("request_", "code", "message"), [
    (limit("buy", "0.001", "40000", market="NOPE-EUR"), 205, "market parameter NOPE-EUR is invalid."),
    (OrderRequest("BTC-EUR", "buy", "limit", price=D("40000")), 203, "amount parameter is required."),
    (OrderRequest("BTC-EUR", "buy", "limit", amount=D("0.001")), 203, "price parameter is required."),
    (OrderRequest("BTC-EUR", "buy", "market"), 203, None),
    (OrderRequest("BTC-EUR", "buy", "market", amount=D("0.001"), amount_quote=D("10")), 206, None),
    (OrderRequest("BTC-EUR", "buy", "limit", amount=D("0.001"), amount_quote=D("10"), price=D("1")),
     206, None),
    (OrderRequest("BTC-EUR", "buy", "limit", amount_quote=D("10"), price=D("40000")), 202, None),
    (OrderRequest("BTC-EUR", "buy", "market", amount=D("0.001"), price=D("40000")), 202,
     "price parameter is not allowed for orderType market."),
    (market("buy", "0.001", time_in_force="IOC"), 202, None),
    (market("buy", "0.001", post_only=True), 202, None),
    (limit("buy", "0", "40000"), 205, "amount parameter 0 is invalid."),
    (limit("buy", "0.001", "-1"), 205, None),
    (limit("buy", "0.001", "40000.5"), 422, None),
    (limit("buy", "0.001", "40000", time_in_force="DAY"), 205, None),
    (limit("buy", "0.000000001", "40000"), 429, None),
    (market("buy", amount_quote="10.001"), 429, None),
    (limit("buy", "0.000001", "40000"), 212, None),
    (limit("buy", "0.0001", "40000"), 217, "Minimum order size in quote currency is 5 EUR."),
    (market("buy", amount_quote="4.99"), 217, None),
    (limit("buy", "101", "10", market="ETH-EUR"), 210, None),
    (limit("buy", "3", "40000"), 216, None),
    (limit("sell", "11", "40000"), 216, None),
    (market("buy", amount_quote="100000.01"), 216, None),
])
def test_place_validation(engine: MatchingEngine, request_: OrderRequest, code: int,
                          message: str | None) -> None:
    error = expect_error(code, lambda: engine.place("alice", request_), message)
    assert isinstance(error, InsufficientBalanceError if code == 216 else InvalidRequestError)
    assert engine.open_orders("alice") == [] and engine.depth("BTC-EUR") == ([], [])


@pytest.mark.parametrize(("side", "amount", "accepted"), [
    # Valued at the best bid (40000), not the best ask (50000) a buy would take.
    ("sell", "0.0001", False),       # 4.00 EUR (5.00 at the ask)
    ("sell", "0.00012499", False),   # 4.9996 EUR
    ("sell", "0.000125", True),      # 5.00 EUR: the minimum itself is allowed
    # Valued at the best ask (50000), not the best bid.
    ("buy", "0.00009999", False),    # 4.9995 EUR
    ("buy", "0.0001", True),         # 5.00 EUR (4.00 at the bid)
])
def test_market_order_by_amount_is_valued_at_the_best_opposite_price(
        engine: MatchingEngine, side: str, amount: str, accepted: bool) -> None:
    engine.set_liquidity_level("mm", "BTC-EUR", "buy", D("40000"), D("1"))
    engine.set_liquidity_level("mm", "BTC-EUR", "sell", D("50000"), D("1"))
    depth = engine.depth("BTC-EUR")
    if accepted:
        result = engine.place("alice", market(side, amount))
        assert result.order.status == "filled" and result.order.filled_amount == D(amount)
        return
    expect_error(217, lambda: engine.place("alice", market(side, amount)),
                 "Minimum order size in quote currency is 5 EUR.")
    assert engine.orders("alice", "BTC-EUR") == [] and engine.depth("BTC-EUR") == depth
    assert (available(engine, "alice", "EUR"), available(engine, "alice", "BTC")) == (EUR0, BTC0)


def test_market_order_by_amount_is_valued_at_the_best_price_not_along_its_walk(engine: MatchingEngine) -> None:
    # Its size is judged where it starts (5.50 EUR at the best bid), as a limit order's is at its
    # price, although walking the thin book it trades only 0.60 EUR in all.
    engine.set_liquidity_level("mm", "BTC-EUR", "buy", D("50000"), D("0.00001"))
    engine.set_liquidity_level("mm", "BTC-EUR", "buy", D("1000"), D("1"))
    order = engine.place("alice", market("sell", "0.00011")).order
    assert order.status == "filled" and order.filled_amount_quote == D("0.60")


def test_market_order_by_amount_against_an_empty_side_is_not_valued(engine: MatchingEngine) -> None:
    # Nothing to value it at and nothing it could trade with: accepted, and it trades nothing.
    engine.set_liquidity_level("mm", "BTC-EUR", "sell", D("50000"), D("1"))
    result = engine.place("alice", market("sell", "0.00001"))
    assert result.order.status == "canceledMarketProtection" and result.fills == []
    assert (available(engine, "alice", "EUR"), available(engine, "alice", "BTC")) == (EUR0, BTC0)


def test_market_order_by_amount_above_the_maximum_notional() -> None:
    rules = MarketRules(market="X-EUR", base="X", quote="EUR", tick_size=D("1"), quantity_decimals=2,
                        notional_decimals=2, min_order_base=D("1"), min_order_quote=D("5"),
                        max_order_quote=D("1000"))
    engine = MatchingEngine([rules], clock=Clock(), id_factory=counter_ids())
    engine.open_account("a", {"EUR": D("100000")}, NO_FEES)
    engine.open_account("mm", {}, NO_FEES, unlimited=True)
    engine.set_liquidity_level("mm", "X-EUR", "sell", D("100"), D("1000"))
    expect_error(210, lambda: engine.place("a", market("buy", "10.01", market="X-EUR")),
                 "amount parameter exceeds the maximum order size of 1000 EUR.")
    assert engine.place("a", market("buy", "10", market="X-EUR")).order.status == "filled"


def test_order_type_not_in_market_rules() -> None:
    rules = MarketRules(market="X-EUR", base="X", quote="EUR", tick_size=D("1"), quantity_decimals=2,
                        notional_decimals=2, min_order_base=D("1"), min_order_quote=D("1"),
                        order_types=("limit",))
    engine = MatchingEngine([rules], clock=Clock(), id_factory=counter_ids())
    engine.open_account("a", {"EUR": D("100")}, NO_FEES)
    expect_error(205, lambda: engine.place("a", market("buy", "1", market="X-EUR")),
                 "orderType parameter is invalid.")


def test_open_order_cap(engine: MatchingEngine) -> None:
    for _ in range(2):
        engine.place("alice", limit("buy", "0.01", "1000", market="ETH-EUR"))
    expect_error(235, lambda: engine.place("alice", limit("buy", "0.01", "1000", market="ETH-EUR")))
    for _ in range(3):  # unlimited accounts model whole-market liquidity: no cap
        engine.place("mm", limit("buy", "0.01", "1000", market="ETH-EUR"))


@pytest.mark.parametrize(("status", "code"), [("halted", 423), ("cancelOnly", 424),
                                               ("auctionMatching", 426)])
def test_market_status_blocks_creates(engine: MatchingEngine, status: str, code: int) -> None:
    order = engine.place("alice", limit("buy", "0.001", "40000")).order
    engine.set_market_status("BTC-EUR", status)
    assert engine.rules("BTC-EUR").status == status
    error = expect_error(code, lambda: engine.place("alice", limit("buy", "0.001", "40000")))
    assert isinstance(error, MarketUnavailableError)
    expect_error(code, lambda: engine.update("alice", "BTC-EUR", OrderUpdate(price=D("39000")),
                                             order_id=order.order_id))
    if status == "halted":
        expect_error(423, lambda: engine.cancel("alice", "BTC-EUR", order_id=order.order_id))
        assert engine.cancel_all("alice") == []
    else:
        assert engine.cancel("alice", "BTC-EUR", order_id=order.order_id).order.status == "canceled"


def test_auction_accepts_only_resting_gtc_limits(engine: MatchingEngine) -> None:
    engine.place("bob", limit("sell", "0.01", "50000"))
    engine.set_market_status("BTC-EUR", "auction")
    expect_error(425, lambda: engine.place("alice", market("buy", "0.001")))
    expect_error(231, lambda: engine.place("alice", limit("buy", "0.001", "40000", time_in_force="IOC")))
    expect_error(425, lambda: engine.place("alice", limit("buy", "0.001", "50000")))
    assert engine.place("alice", limit("buy", "0.001", "49999")).order.status == "new"
    with pytest.raises(ValueError, match="unknown market status"):
        engine.set_market_status("BTC-EUR", "sleeping")


# ---------------------------------------------------------------- liquidity levels

def test_liquidity_level_set_grow_shrink_remove(engine: MatchingEngine) -> None:
    first = engine.set_liquidity_level("mm", "BTC-EUR", "sell", D("50000"), D("1"))
    assert first is not None and first.level_changes == [LevelChange("sell", D("50000"), D("1"))]
    assert engine.set_liquidity_level("mm", "BTC-EUR", "sell", D("50000"), D("1")) is None
    assert engine.set_liquidity_level("mm", "BTC-EUR", "sell", D("49000"), D("0")) is None
    grown = engine.set_liquidity_level("mm", "BTC-EUR", "sell", D("50000"), D("1.5"))
    assert grown is not None and grown.order is first.order and first.order.amount == D("1.5")
    shrunk = engine.set_liquidity_level("mm", "BTC-EUR", "sell", D("50000"), D("0.25"))
    assert shrunk is not None and shrunk.level_changes == [LevelChange("sell", D("50000"), D("0.25"))]
    assert engine.best_ask("BTC-EUR") == (D("50000"), D("0.25"))
    assert in_order(engine, "mm", "BTC") == D("0.25")
    gone = engine.set_liquidity_level("mm", "BTC-EUR", "sell", D("50000"), D("0"))
    assert gone is not None and gone.order.status == "canceled"
    assert engine.best_ask("BTC-EUR") is None and in_order(engine, "mm", "BTC") == 0
    assert available(engine, "mm", "BTC") == 0


def test_liquidity_growth_behind_others_loses_priority(engine: MatchingEngine) -> None:
    engine.set_liquidity_level("mm", "BTC-EUR", "sell", D("50000"), D("0.01"))
    engine.place("bob", limit("sell", "0.01", "50000"))
    result = engine.set_liquidity_level("mm", "BTC-EUR", "sell", D("50000"), D("0.02"))
    assert result is not None and result.level_changes == [LevelChange("sell", D("50000"), D("0.03"))]
    taker = engine.place("alice", market("buy", "0.01"))
    assert [f.account_id for f in taker.maker_fills] == ["bob"]


def test_liquidity_shrink_takes_from_newest_own_orders(engine: MatchingEngine) -> None:
    older = engine.place("mm", limit("buy", "0.01", "40000")).order
    newer = engine.place("mm", limit("buy", "0.02", "40000")).order
    result = engine.set_liquidity_level("mm", "BTC-EUR", "buy", D("40000"), D("0.005"))
    assert result is not None and result.order is newer and newer.status == "canceled"
    assert result.touched_orders == [older] and older.amount_remaining == D("0.005")
    assert in_order(engine, "mm", "EUR") == D("200.00")


def test_liquidity_level_that_crosses_trades_as_taker_then_rests(engine: MatchingEngine) -> None:
    engine.place("alice", limit("buy", "0.01", "50000"))
    engine.place("bob", limit("buy", "0.01", "49990"))
    result = engine.set_liquidity_level("mm", "BTC-EUR", "sell", D("49990"), D("0.05"))
    assert result is not None
    assert [(f.account_id, f.price) for f in result.maker_fills] == [("alice", D("50000")),
                                                                     ("bob", D("49990"))]
    assert all(f.taker for f in result.fills)
    assert result.order.status == "partiallyFilled"
    assert engine.best_ask("BTC-EUR") == (D("49990"), D("0.03"))
    assert engine.best_bid("BTC-EUR") is None
    assert result.level_changes == [LevelChange("buy", D("50000"), D("0")),
                                    LevelChange("buy", D("49990"), D("0")),
                                    LevelChange("sell", D("49990"), D("0.03"))]
    # Unlimited accounts are tracked: mm sold 0.02 BTC it never had.
    assert available(engine, "mm", "BTC") == D("-0.05") and in_order(engine, "mm", "BTC") == D("0.03")
    assert total(engine, ("alice", "bob", "mm"), "BTC") == 2 * BTC0
    assert total(engine, ("alice", "bob", "mm"), "EUR") == 2 * EUR0


def test_liquidity_level_replaces_own_stale_crossing_quote(engine: MatchingEngine) -> None:
    engine.set_liquidity_level("mm", "BTC-EUR", "sell", D("50000"), D("1"))
    result = engine.set_liquidity_level("mm", "BTC-EUR", "buy", D("50001"), D("1"))
    assert result is not None and result.fills == []
    assert result.touched_orders[0].status == "canceledSelfTradePrevention"
    assert engine.depth("BTC-EUR") == ([(D("50001"), D("1"))], [])


def test_liquidity_level_validation(engine: MatchingEngine) -> None:
    expect_error(205, lambda: engine.set_liquidity_level("mm", "NOPE-EUR", "buy", D("1"), D("1")))
    expect_error(422, lambda: engine.set_liquidity_level("mm", "BTC-EUR", "buy", D("1.5"), D("1")))
    expect_error(429, lambda: engine.set_liquidity_level("mm", "BTC-EUR", "buy", D("1"), D("0.000000001")))
    expect_error(205, lambda: engine.set_liquidity_level("mm", "BTC-EUR", "buy", D("1"), D("-1")))
    expect_error(216, lambda: engine.set_liquidity_level("alice", "BTC-EUR", "buy", D("40000"), D("3")))


# ---------------------------------------------------------------- fees: rebates and conservation

def test_negative_maker_fee_is_a_rebate_and_conserves() -> None:
    engine = make_engine()
    engine.open_account("rebated", {"EUR": D("1000"), "BTC": D("1")},
                        FeeRates(maker=D("-0.0001"), taker=D("0.0025")))
    resting = engine.place("rebated", limit("buy", "0.01", "40000")).order
    assert resting.on_hold == D("401.00")  # hold at the taker rate
    result = engine.place("bob", market("sell", "0.01"))
    (maker_fill,) = result.maker_fills
    assert maker_fill.fee == D("-0.04")  # ceil2(400 * 0.9999) = 399.96
    assert available(engine, "rebated", "EUR") == D("1000") - D("399.96")
    assert in_order(engine, "rebated", "EUR") == 0
    assert engine.collected_fees()["EUR"] == D("1.00") - D("0.04")
    accounts = ("alice", "bob", "mm", "rebated")
    assert total(engine, accounts, "EUR") == 2 * EUR0 + D("1000")
    assert total(engine, accounts, "BTC") == 2 * BTC0 + D("1")


def test_sell_maker_order_fees(engine: MatchingEngine) -> None:
    engine.place("alice", limit("sell", "0.00020002", "34469"))
    result = engine.place("bob", market("buy", "0.00020002"))
    # Maker at 0.15%: floor2(6.89448938 * 0.9985) = 6.88 -> fee 0.01448938.
    assert result.maker_fills[0].fee == D("0.01448938")
    assert result.fills[0].fee == D("6.92") - D("6.89448938")
    assert available(engine, "alice", "EUR") == EUR0 + D("6.88")
    assert engine.orders("alice", "BTC-EUR")[0].to_wire()["feePaid"] == "0.01448938"


# ---------------------------------------------------------------- fees: cumulative rounding per order

def test_buy_filled_in_parts_never_pays_more_than_its_hold(engine: MatchingEngine) -> None:
    # Reviewer's repro: per-fill rounding debited 3 x ceil2(5.0005*1.0025) = 15.06 from a 15.04 hold.
    engine.open_account("dave", {"EUR": D("15.04")}, CATEGORY_A)
    for _ in range(3):
        engine.place("mm", limit("sell", "0.0005", "10001"))
    placed = engine.place("dave", limit("buy", "0.0015", "10001"))
    order = placed.order
    assert order.status == "filled" and len(placed.fills) == 3
    gross = D("0.0015") * D("10001")  # 15.0015
    debit = ceil_to(gross * D("1.0025"), 2)  # the hold: ceil2(15.03900375)
    assert debit == D("15.04")
    assert order.fee_paid == debit - gross == D("0.0385")
    # ceil2 of the cumulative cost after each fill: 5.02, 10.03, 15.04.
    assert [f.fee for f in placed.fills] == [D("0.0195"), D("0.0095"), D("0.0095")]
    assert available(engine, "dave", "EUR") == 0 and in_order(engine, "dave", "EUR") == 0
    assert available(engine, "dave", "BTC") == D("0.0015")
    accounts = ("alice", "bob", "mm", "dave")
    assert total(engine, accounts, "EUR") == 2 * EUR0 + D("15.04")


def test_order_taking_then_resting_pays_at_most_its_hold(engine: MatchingEngine) -> None:
    # Rounded per role, 0.0001 taken at 9800 then 0.0007 filled as maker would cost
    # ceil2(0.98*1.0025) + ceil2(6.86*1.0015) = 0.99 + 6.88 = 7.87 against a 7.86 hold.
    engine.open_account("erin", {"EUR": D("7.86")}, CATEGORY_A)
    engine.set_liquidity_level("mm", "BTC-EUR", "sell", D("9800"), D("0.0001"))
    placed = engine.place("erin", limit("buy", "0.0008", "9800")).order
    assert placed.status == "partiallyFilled" and placed.fee_paid == D("0.01")  # 0.99 - 0.98
    # What the rest can still cost: ceil2(0.98245 + 6.86*1.0025) - ceil2(0.98245) = 7.86 - 0.99.
    assert placed.on_hold == D("6.87") and available(engine, "erin", "EUR") == 0
    engine.place("mm", market("sell", "0.0007"))
    assert placed.status == "filled"
    # One cumulative rounding over both roles: ceil2(0.98*1.0025 + 6.86*1.0015) = 7.86.
    assert placed.fee_paid == D("7.86") - D("7.84")
    assert [f.taker for f in placed.fills] == [True, False]
    assert available(engine, "erin", "EUR") == 0 and in_order(engine, "erin", "EUR") == 0


def test_sell_filled_in_parts_gets_the_single_fill_credit(engine: MatchingEngine) -> None:
    engine.place("mm", limit("buy", "0.0005", "10001"))
    engine.place("mm", limit("buy", "0.0005", "10001"))
    placed = engine.place("alice", market("sell", "0.001"))
    assert len(placed.fills) == 2
    # floor2(10.001*0.9975) = 9.97 in all (per fill it would be 2 x floor2(4.98799875) = 9.96).
    assert available(engine, "alice", "EUR") == EUR0 + D("9.97")
    assert [f.fee for f in placed.fills] == [D("0.0205"), D("0.0105")]


def test_debit_beyond_hold_and_balance_is_an_invariant_error(engine: MatchingEngine) -> None:
    order = engine.place("alice", limit("buy", "0.001", "40000")).order
    acct = engine._accounts["alice"]
    with pytest.raises(AssertionError, match="overdraw"):
        engine._debit(acct, order, "EUR", order.on_hold + available(engine, "alice", "EUR") + D("0.01"))
    assert order.on_hold == D("40.10")  # nothing moved


@pytest.mark.parametrize(("field", "code"), [("price", 211), ("amount", 210)])
def test_absurd_magnitudes_are_refused_not_crashing(engine: MatchingEngine, field: str, code: int) -> None:
    values = {"amount": "0.01", "price": "30000", field: "1e30"}
    expect_error(code, lambda: engine.place("alice", limit("buy", values["amount"], values["price"])))
    expect_error(211, lambda: engine.set_liquidity_level("mm", "BTC-EUR", "sell", D("1e30"), D("1")))
