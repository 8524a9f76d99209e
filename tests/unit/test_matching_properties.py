"""Property tests of the matching engine: conservation, an uncrossed book, holds, fills and fee rounding."""

from __future__ import annotations

import itertools
from collections import defaultdict
from decimal import Decimal
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from trading.decimals import ceil_to, floor_to
from trading.exchange.errors import BitvavoError
from trading.matching import (
    FeeRates,
    Fill,
    MarketRules,
    MatchingEngine,
    MatchResult,
    Order,
    OrderRequest,
    OrderUpdate,
)

D = Decimal
UNIT = D("0.001")  # size step of generated orders; the market allows 5 decimals
RULES = MarketRules(market="BTC-EUR", base="BTC", quote="EUR", tick_size=D("1"), quantity_decimals=5,
                    notional_decimals=2, min_order_base=UNIT, min_order_quote=D("0"))
# Small notionals (0.001 x ~100 EUR) make per-fill cent rounding dominate; rates include a rebate.
FEES = {
    "alice": FeeRates(maker=D("0.0015"), taker=D("0.0025")),
    "bob": FeeRates(maker=D("-0.0005"), taker=D("0.002")),
    "mm": FeeRates(maker=D("0"), taker=D("0.001")),
}
LIMITED = ("alice", "bob")
START = {"EUR": D("20"), "BTC": D("0.2")}
INITIAL_TOTAL = {symbol: amount * len(LIMITED) for symbol, amount in START.items()}

accounts = st.sampled_from(("alice", "bob", "mm"))
sides = st.sampled_from(("buy", "sell"))
prices = st.integers(98, 102).map(D)
units = st.integers(1, 60).map(lambda n: n * UNIT)
stp_modes = st.sampled_from(("decrementAndCancel", "cancelOldest", "cancelNewest", "cancelBoth"))


def fill_cost(fill: Fill) -> Decimal:
    """Quote a fill consumed from an amountQuote budget: what a buyer paid, what a seller sold."""
    gross = fill.amount * fill.price
    return gross + fill.fee if fill.side == "buy" else gross


def check_cumulative_fees(order: Order) -> None:
    """Fees are rounded cumulatively per order (spec §5.6 applied to the order's fills so far): after
    each fill a buy has paid ceil2(B) and a seller got floor2(B), B = sum of gross*(1 +- rate) at
    each fill's own role's rate. So the fills together never cost more than one fill would."""
    rates = FEES[order.account_id]
    sign = 1 if order.side == "buy" else -1
    basis = paid = D(0)
    for fill in order.fills:
        gross = fill.amount * fill.price
        basis += gross * (1 + sign * (rates.taker if fill.taker else rates.maker))
        paid += gross + sign * fill.fee
        assert paid == (ceil_to(basis, 2) if order.side == "buy" else floor_to(basis, 2))
    if rates.maker >= 0 and rates.taker >= 0:
        assert order.fee_paid >= 0


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        ids = itertools.count(1)
        self.clock = 0
        self.engine = MatchingEngine([RULES], clock=self.tick, id_factory=lambda: f"id-{next(ids)}")
        for name in LIMITED:
            self.engine.open_account(name, dict(START), FEES[name])
        self.engine.open_account("mm", {}, FEES["mm"], unlimited=True)
        self.orders: dict[str, Order] = {}

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def state(self) -> Any:
        return ({name: self.engine.balances(name) for name in FEES}, self.engine.depth("BTC-EUR"),
                self.engine.collected_fees(),
                sorted((o.order_id, o.status, o.amount_remaining) for o in self.orders.values()))

    def apply(self, call: Any) -> None:
        """Run one engine call; a rejected call must leave no trace."""
        before = self.state()
        try:
            result = call()
        except BitvavoError:
            assert self.state() == before
            return
        if result is not None:
            self.check_result(result)
            self.check_level_changes([result])

    def check_level_changes(self, results: list[MatchResult]) -> None:
        """The reported level sizes, last one per level, are the book's sizes now."""
        bids, asks = self.engine.depth("BTC-EUR")
        book = {("buy", p): s for p, s in bids} | {("sell", p): s for p, s in asks}
        reported = {(c.side, c.price): c.size for result in results for c in result.level_changes}
        for level, size in reported.items():
            assert book.get(level, D(0)) == size

    def check_result(self, result: MatchResult) -> None:
        for order in (result.order, *result.touched_orders):
            self.orders[order.order_id] = order
        order = result.order
        if order.post_only:
            assert result.fills == []
        if order.time_in_force == "FOK":
            assert order.status == "filled" or (order.status in ("canceledFOK", "canceledPostOnly")
                                                and result.fills == [])
        makers = {o.order_id: o for o in result.touched_orders}
        for fill in (*result.fills, *result.maker_fills):
            limit = (order if fill.order_id == order.order_id else makers[fill.order_id]).price
            if limit is not None:  # never through a limit price
                assert fill.price <= limit if fill.side == "buy" else fill.price >= limit
        assert len(result.trades) == len(result.fills) == len(result.maker_fills)
        for trade, taker, maker in zip(result.trades, result.fills, result.maker_fills, strict=True):
            assert trade.trade_id == taker.fill_id == maker.fill_id
            assert (trade.amount, trade.price, trade.side) == (taker.amount, taker.price, taker.side)
            assert taker.taker and not maker.taker and taker.side != maker.side
            assert taker.account_id != maker.account_id  # self-trade prevention
        for order in (result.order, *result.touched_orders):
            check_cumulative_fees(order)

    @initialize(spread=st.integers(1, 3), size=st.integers(1, 30).map(lambda n: n * UNIT))
    def seed_book(self, spread: int, size: Decimal) -> None:
        """Start with liquidity around 100 so most runs trade."""
        for offset in range(spread):
            for side, price in (("buy", D(99 - offset)), ("sell", D(101 + offset))):
                result = self.engine.set_liquidity_level("mm", "BTC-EUR", side, price, size)  # type: ignore[arg-type]
                assert result is not None
                self.check_result(result)

    @rule(account=accounts, side=sides, amount=units, price=prices,
          tif=st.sampled_from(("GTC", "GTC", "IOC", "FOK")), post_only=st.booleans(), stp=stp_modes)
    def place_limit(self, account: str, side: str, amount: Decimal, price: Decimal, tif: str,
                    post_only: bool, stp: str) -> None:
        request = OrderRequest("BTC-EUR", side, "limit", amount=amount, price=price,  # type: ignore[arg-type]
                               time_in_force=tif, post_only=post_only,  # type: ignore[arg-type]
                               self_trade_prevention=stp)  # type: ignore[arg-type]
        self.apply(lambda: self.engine.place(account, request))

    @rule(account=accounts, side=sides, amount=units, quote_cents=st.integers(1, 1500), by_quote=st.booleans(),
          stp=stp_modes)
    def place_market(self, account: str, side: str, amount: Decimal, quote_cents: int, by_quote: bool,
                     stp: str) -> None:
        request = OrderRequest("BTC-EUR", side, "market", amount=None if by_quote else amount,  # type: ignore[arg-type]
                               amount_quote=D(quote_cents) / 100 if by_quote else None,
                               self_trade_prevention=stp)  # type: ignore[arg-type]
        self.apply(lambda: self.engine.place(account, request))

    @rule(account=accounts, pick=st.integers(0, 50))
    def cancel(self, account: str, pick: int) -> None:
        open_orders = self.engine.open_orders(account, "BTC-EUR")
        if open_orders:
            order = open_orders[pick % len(open_orders)]
            self.apply(lambda: self.engine.cancel(account, "BTC-EUR", order_id=order.order_id))

    @rule(account=accounts, pick=st.integers(0, 50), price=st.none() | prices, amount=st.none() | units,
          remaining=st.booleans(), tif=st.none() | st.sampled_from(("GTC", "IOC", "FOK")),
          post_only=st.none() | st.booleans())
    def update(self, account: str, pick: int, price: Decimal | None, amount: Decimal | None,
               remaining: bool, tif: str | None, post_only: bool | None) -> None:
        open_orders = self.engine.open_orders(account, "BTC-EUR")
        if not open_orders:
            return
        order = open_orders[pick % len(open_orders)]
        changes = OrderUpdate(amount=None if remaining else amount, amount_remaining=amount if remaining else None,
                              price=price, time_in_force=tif, post_only=post_only)  # type: ignore[arg-type]
        self.apply(lambda: self.engine.update(account, "BTC-EUR", changes, order_id=order.order_id))

    @rule(account=accounts, side=sides, price=prices, size=st.integers(0, 60).map(lambda n: n * UNIT))
    def set_level(self, account: str, side: str, price: Decimal, size: Decimal) -> None:
        self.apply(lambda: self.engine.set_liquidity_level(account, "BTC-EUR", side, price, size))  # type: ignore[arg-type]

    @rule(account=accounts)
    def cancel_all(self, account: str) -> None:
        before = {o.order_id for o in self.engine.open_orders(account)}
        results = self.engine.cancel_all(account)
        assert {r.order.order_id for r in results} == before
        for result in results:
            self.check_result(result)
        self.check_level_changes(results)
        assert self.engine.open_orders(account) == []

    @invariant()
    def balances_are_conserved_net_of_fees(self) -> None:
        fees = self.engine.collected_fees()
        for symbol, initial in INITIAL_TOTAL.items():
            held = sum((b.available + b.in_order for name in FEES
                        for sym, b in self.engine.balances(name).items() if sym == symbol), D(0))
            assert held + fees[symbol] == initial
            # EUR stays on the cent grid, BTC on the quantity grid.
            places = 2 if symbol == "EUR" else 5
            for name in FEES:
                balance = self.engine.balances(name)[symbol]
                assert balance.available == ceil_to(balance.available, places)

    @invariant()
    def book_is_never_crossed(self) -> None:
        bid, ask = self.engine.best_bid("BTC-EUR"), self.engine.best_ask("BTC-EUR")
        if bid is not None and ask is not None:
            assert bid[0] < ask[0]

    @invariant()
    def levels_are_the_sum_of_open_orders(self) -> None:
        expected: dict[tuple[str, Decimal], Decimal] = defaultdict(Decimal)
        for name in FEES:
            for order in self.engine.open_orders(name):
                assert order.order_type == "limit" and order.price is not None
                assert order.amount_remaining is not None and order.amount_remaining > 0
                expected[(order.side, order.price)] += order.amount_remaining
        bids, asks = self.engine.depth("BTC-EUR")
        actual = {("buy", p): s for p, s in bids} | {("sell", p): s for p, s in asks}
        assert actual == dict(expected)
        assert [p for p, _ in bids] == sorted((p for p, _ in bids), reverse=True)
        assert [p for p, _ in asks] == sorted(p for p, _ in asks)

    @invariant()
    def in_order_is_the_sum_of_holds(self) -> None:
        for name in FEES:
            holds: dict[str, Decimal] = defaultdict(Decimal)
            for order in self.engine.open_orders(name):
                assert order.on_hold >= 0
                holds[order.on_hold_currency] += order.on_hold
            for symbol, balance in self.engine.balances(name).items():
                assert balance.in_order == holds[symbol]

    @invariant()
    def limited_accounts_stay_funded(self) -> None:
        # Strict: fills are paid from holds (cumulative fee rounding), never from an overdraft.
        for name in LIMITED:
            for balance in self.engine.balances(name).values():
                assert balance.available >= 0 and balance.in_order >= 0

    @invariant()
    def fills_never_exceed_the_order(self) -> None:
        for order in self.orders.values():
            assert order.filled_amount == sum((f.amount for f in order.fills), D(0))
            assert order.fee_paid == sum((f.fee for f in order.fills), D(0))
            assert order.filled_amount_quote == sum((f.amount * f.price for f in order.fills), D(0))
            if order.amount is not None:
                assert order.amount_remaining is not None and order.amount_remaining >= 0
                assert order.filled_amount + order.amount_remaining <= order.amount
            else:
                assert order.amount_quote is not None and order.amount_quote_remaining is not None
                spent = sum((fill_cost(f) for f in order.fills), D(0))
                assert spent <= order.amount_quote
                assert order.amount_quote_remaining >= 0
            if not order.is_open:
                assert order.on_hold == 0
            if order.status == "filled":
                assert order.fills
            if order.status in ("canceledFOK", "canceledPostOnly"):
                # Nothing traded in the call that cancelled it (the clock ticks once per call).
                assert all(f.timestamp != order.updated for f in order.fills)


EngineMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
TestEngineMachine = EngineMachine.TestCase


@settings(max_examples=200, deadline=None)
@given(side=sides, amount=st.integers(1, 10**6).map(lambda n: D(n) / 10**8),
       price=st.integers(1000, 100_000).map(D), rate=st.integers(-10, 40).map(lambda n: D(n) / 10_000))
@example(side="sell", amount=D("0.00020002"), price=D("34469"), rate=D("0.0025"))
@example(side="buy", amount=D("0.0002"), price=D("34488"), rate=D("0.0025"))
@example(side="sell", amount=D("0.0002"), price=D("34464"), rate=D("0.0025"))
def test_taker_fee_rounding(side: str, amount: Decimal, price: Decimal, rate: Decimal) -> None:
    rules = MarketRules(market="BTC-EUR", base="BTC", quote="EUR", tick_size=D("1"), quantity_decimals=8,
                        notional_decimals=2, min_order_base=D("0.00000001"), min_order_quote=D("0"))
    ids = itertools.count(1)
    engine = MatchingEngine([rules], clock=lambda: 1, id_factory=lambda: f"id-{next(ids)}")
    engine.open_account("taker", {"EUR": D("100000"), "BTC": D("1")}, FeeRates(maker=D(0), taker=rate))
    engine.open_account("maker", {}, FeeRates(maker=D(0), taker=D(0)), unlimited=True)
    engine.set_liquidity_level("maker", "BTC-EUR", "sell" if side == "buy" else "buy", price, D("1"))
    request = OrderRequest("BTC-EUR", side, "market", amount=amount)  # type: ignore[arg-type]
    (fill,) = engine.place("taker", request).fills
    gross = amount * price
    eur = engine.balances("taker")["EUR"].available - D("100000")
    if side == "sell":
        assert eur == floor_to(gross * (1 - rate), 2) == gross - fill.fee
    else:
        assert -eur == ceil_to(gross * (1 + rate), 2) == gross + fill.fee
    # The spec's real fills (§5.6).
    real = {(D("0.00020002"), D("34469")): D("0.02448938"), (D("0.0002"), D("34488")): D("0.0224"),
            (D("0.0002"), D("34464")): D("0.0228")}
    if rate == D("0.0025") and (amount, price) in real:
        assert fill.fee == real[(amount, price)]


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.integers(1, 10_000), min_size=1, max_size=8),
       price=st.integers(1000, 100_000).map(D), rate=st.integers(0, 40).map(lambda n: D(n) / 10_000),
       side=sides)
@example(parts=[50_000, 50_000, 50_000], price=D("10001"), rate=D("0.0025"), side="buy")  # reviewer's repro
def test_order_filled_in_parts_costs_what_one_fill_would(parts: list[int], price: Decimal, rate: Decimal,
                                                        side: str) -> None:
    """An order crossing several resting orders pays (or gets) exactly the single-fill rounding of
    its total; a buyer funded with exactly the hold ends at zero, never below."""
    rules = MarketRules(market="BTC-EUR", base="BTC", quote="EUR", tick_size=D("1"), quantity_decimals=8,
                        notional_decimals=2, min_order_base=D("0.00000001"), min_order_quote=D("0"))
    ids = itertools.count(1)
    engine = MatchingEngine([rules], clock=lambda: 1, id_factory=lambda: f"id-{next(ids)}")
    sizes = [D(n) / 10**8 for n in parts]
    amount = sum(sizes, D(0))
    gross = amount * price
    hold = ceil_to(gross * (1 + rate), 2)
    start = {"EUR": hold} if side == "buy" else {"BTC": amount}
    engine.open_account("user", start, FeeRates(maker=D(0), taker=rate))
    engine.open_account("mm", {}, FeeRates(maker=D(0), taker=D(0)), unlimited=True)
    for size in sizes:
        engine.place("mm", OrderRequest("BTC-EUR", "sell" if side == "buy" else "buy", "limit",
                                        amount=size, price=price))
    result = engine.place("user", OrderRequest("BTC-EUR", side, "limit", amount=amount, price=price))  # type: ignore[arg-type]
    assert result.order.status == "filled" and len(result.fills) == len(sizes)
    balances = engine.balances("user")
    if side == "buy":
        assert balances["EUR"].available == 0 and result.order.fee_paid == hold - gross
        assert balances["BTC"].available == amount
    else:
        assert balances["EUR"].available == floor_to(gross * (1 - rate), 2) == gross - result.order.fee_paid
        assert balances["BTC"].available == 0
    assert all(b.in_order == 0 for b in balances.values())
    assert result.order.fee_paid >= 0
