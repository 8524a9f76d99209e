"""ONE matching engine: price-time priority order books with Bitvavo's order semantics.

Used by the simulator (the exchange it serves) and by paper execution (dry-run fills against
the live book). Decimal throughout; times are UTC ms from the injected clock.

CONTRACT (types and method signatures are fixed; bodies are implemented below):
- Accounts hold balances per symbol (available / in_order). An `unlimited` account (market
  maker, external liquidity, simulated order flow) skips balance checks but its balances are
  still tracked (they may go negative), so conservation across all accounts holds.
- Every mutating call returns a `MatchResult` listing what changed: the order, its taker fills,
  the maker fills of resting orders it hit, the resting orders whose state changed, the
  public trades, and the aggregated book level changes in the order they happened.
- Validation failures raise `trading.exchange.errors.BitvavoError` subclasses with the spec's
  error codes (205, 203, 206, 212, 216, 217, 220, 222..240, 422, 429, 423..426, ...).
- Size limits (210/212/217): an order's quote size is its amountQuote, or amount x its limit
  price, or for a market order by amount, amount x the best opposite price (best ask for a buy,
  best bid for a sell). A market order by amount facing an empty side has no quote size and
  skips the quote limits; it trades nothing (canceledMarketProtection).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import islice
from typing import Any, Literal

from sortedcontainers import SortedDict

from trading.decimals import ZERO, ceil_to, decimal_places, floor_to, format_decimal
from trading.exchange.errors import ERROR_SPECS, BitvavoError, exception_class_for

Side = Literal["buy", "sell"]
OrderType = Literal["market", "limit"]
TimeInForce = Literal["GTC", "IOC", "FOK"]
SelfTradePrevention = Literal["decrementAndCancel", "cancelOldest", "cancelNewest", "cancelBoth"]

OPEN_STATUSES = frozenset({"new", "partiallyFilled", "awaitingTrigger"})


@dataclass(frozen=True)
class MarketRules:
    """Static trading rules of one market (GET /markets)."""

    market: str
    base: str
    quote: str
    tick_size: Decimal
    quantity_decimals: int
    notional_decimals: int
    min_order_base: Decimal
    min_order_quote: Decimal
    max_order_base: Decimal = Decimal("1000000000")
    max_order_quote: Decimal = Decimal("1000000000")
    max_open_orders: int = 100
    status: str = "trading"
    order_types: tuple[str, ...] = ("market", "limit")


@dataclass(frozen=True)
class FeeRates:
    maker: Decimal
    taker: Decimal


@dataclass(frozen=True)
class OrderRequest:
    market: str
    side: Side
    order_type: OrderType
    amount: Decimal | None = None
    amount_quote: Decimal | None = None
    price: Decimal | None = None
    time_in_force: TimeInForce = "GTC"
    post_only: bool = False
    client_order_id: str | None = None
    operator_id: int | None = None
    self_trade_prevention: SelfTradePrevention = "decrementAndCancel"


@dataclass(frozen=True)
class OrderUpdate:
    """PUT /order: at most one of amount / amount_remaining; anything None stays as it is."""

    amount: Decimal | None = None
    amount_remaining: Decimal | None = None
    price: Decimal | None = None
    time_in_force: TimeInForce | None = None
    post_only: bool | None = None
    self_trade_prevention: SelfTradePrevention | None = None
    operator_id: int | None = None


@dataclass(frozen=True)
class Fill:
    fill_id: str
    order_id: str
    account_id: str
    market: str
    side: Side
    amount: Decimal
    price: Decimal
    taker: bool
    fee: Decimal
    fee_currency: str
    timestamp: int
    client_order_id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """As inside an order's `fills` list (spec §5.4)."""
        return {
            "id": self.fill_id,
            "timestamp": self.timestamp,
            "amount": format_decimal(self.amount),
            "price": format_decimal(self.price),
            "taker": self.taker,
            "fee": format_decimal(self.fee),
            "feeCurrency": self.fee_currency,
            "settled": True,
        }


@dataclass(frozen=True)
class Trade:
    """A public trade; `side` is the taker's side."""

    trade_id: str
    market: str
    amount: Decimal
    price: Decimal
    side: Side
    timestamp: int


@dataclass
class Order:
    order_id: str
    account_id: str
    market: str
    side: Side
    order_type: OrderType
    created: int
    updated: int
    status: str
    amount: Decimal | None
    amount_remaining: Decimal | None
    amount_quote: Decimal | None
    amount_quote_remaining: Decimal | None
    price: Decimal | None
    on_hold: Decimal
    on_hold_currency: str
    filled_amount: Decimal
    filled_amount_quote: Decimal
    fee_paid: Decimal
    fee_currency: str
    time_in_force: TimeInForce | None
    post_only: bool | None
    self_trade_prevention: SelfTradePrevention
    visible: bool
    client_order_id: str | None = None
    operator_id: int | None = None
    fills: list[Fill] = field(default_factory=list)

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    def to_wire(self) -> dict[str, Any]:
        """Bitvavo's order object (spec §5.4): string decimals, field presence rules."""
        wire: dict[str, Any] = {
            "orderId": self.order_id,
            "market": self.market,
            "created": self.created,
            "updated": self.updated,
            "status": self.status,
            "side": self.side,
            "orderType": self.order_type,
        }
        if self.client_order_id is not None:
            wire["clientOrderId"] = self.client_order_id
        if self.amount is not None:
            wire["amount"] = format_decimal(self.amount)
            wire["amountRemaining"] = format_decimal(_remaining(self))
        if self.amount_quote is not None:
            wire["amountQuote"] = format_decimal(self.amount_quote)
            wire["amountQuoteRemaining"] = format_decimal(self.amount_quote_remaining or ZERO)
        if self.order_type == "limit" and self.price is not None:
            wire["price"] = format_decimal(self.price)
        wire.update({
            "onHold": format_decimal(self.on_hold),
            "onHoldCurrency": self.on_hold_currency,
            "filledAmount": format_decimal(self.filled_amount),
            "filledAmountQuote": format_decimal(self.filled_amount_quote),
            "feePaid": format_decimal(self.fee_paid),
            "feeCurrency": self.fee_currency,
            "fills": [fill.to_wire() for fill in self.fills],
            "selfTradePrevention": self.self_trade_prevention,
            "visible": self.visible,
        })
        if self.time_in_force is not None:
            wire["timeInForce"] = self.time_in_force
        if self.post_only is not None:
            wire["postOnly"] = self.post_only
        if self.order_type == "market":
            # Deprecated flag that real market orders still carry (always false).
            wire["disableMarketProtection"] = False
        if self.operator_id is not None:
            wire["operatorId"] = self.operator_id
        return wire


@dataclass(frozen=True)
class LevelChange:
    """Aggregated book change: the new total size at `price` on `side` ('buy' = bids); 0 = gone."""

    side: Side
    price: Decimal
    size: Decimal


@dataclass
class MatchResult:
    order: Order
    fills: list[Fill] = field(default_factory=list)
    maker_fills: list[Fill] = field(default_factory=list)
    touched_orders: list[Order] = field(default_factory=list)
    trades: list[Trade] = field(default_factory=list)
    level_changes: list[LevelChange] = field(default_factory=list)


@dataclass(frozen=True)
class Balance:
    symbol: str
    available: Decimal
    in_order: Decimal


_SIDES = ("buy", "sell")
_TIME_IN_FORCE = ("GTC", "IOC", "FOK")
_STP_MODES = ("decrementAndCancel", "cancelOldest", "cancelNewest", "cancelBoth")
MARKET_STATUSES = ("trading", "halted", "auction", "auctionMatching", "cancelOnly")  # spec §6
# Prices and amounts from 10**15 up are refused as above any market's maximum (211/210); beyond
# that, Decimal's 28-digit context can no longer do tick arithmetic exactly.
MAGNITUDE_LIMIT_EXPONENT = 15
_STP_CANCELED = "canceledSelfTradePrevention"


def _error(code: int, message: str | None = None) -> BitvavoError:
    http_status, default = ERROR_SPECS[code]
    return exception_class_for(code)(code, message or default, http_status)


def _remaining(order: Order) -> Decimal:
    """Base amount still open; resting (limit) orders are always placed with `amount`."""
    if order.amount_remaining is None:
        raise AssertionError(f"order {order.order_id} was placed with amountQuote")
    return order.amount_remaining


def _limit_price(order: Order) -> Decimal:
    if order.price is None:
        raise AssertionError(f"order {order.order_id} has no limit price")
    return order.price


def _invalid(param: str, value: object) -> BitvavoError:
    shown = format_decimal(value) if isinstance(value, Decimal) else value
    return _error(205, f"{param} parameter {shown} is invalid.")


class _Level:
    """One price level: FIFO queue, aggregated size, and each account's orders (for liquidity levels)."""

    __slots__ = ("by_account", "orders", "total")

    def __init__(self) -> None:
        self.orders: deque[Order] = deque()
        self.total = ZERO
        self.by_account: dict[str, list[Order]] = {}


class _Book:
    __slots__ = ("asks", "bids", "rules")

    def __init__(self, rules: MarketRules) -> None:
        self.rules = rules
        # Keyed by Decimal price, ascending: best bid is the last key, best ask the first.
        self.bids: Any = SortedDict()
        self.asks: Any = SortedDict()

    def levels(self, side: str) -> Any:
        return self.bids if side == "buy" else self.asks


class _History:
    """One account's orders and fills in one market."""

    __slots__ = ("by_client_id", "closed", "fee_basis", "fills", "open", "orders")

    def __init__(self, limit: int) -> None:
        self.orders: dict[str, Order] = {}  # retained orders, creation order
        self.open: dict[str, Order] = {}
        self.closed: deque[Order] = deque()  # close order, for pruning
        self.fills: deque[Fill] = deque(maxlen=limit)
        self.by_client_id: dict[str, Order] = {}  # newest order per clientOrderId
        # Open orders with fills: the unrounded quote they moved so far, sum of gross*(1+rate)
        # (buys) or gross*(1-rate) (sells), each fill at its own role's rate (see _settle).
        self.fee_basis: dict[str, Decimal] = {}


class _Account:
    __slots__ = ("account_id", "available", "fees", "history", "in_order", "unlimited")

    def __init__(self, account_id: str, available: dict[str, Decimal], fees: FeeRates,
                 unlimited: bool) -> None:
        self.account_id = account_id
        self.available = available
        self.in_order = dict.fromkeys(available, ZERO)
        self.fees = fees
        self.unlimited = unlimited
        self.history: dict[str, _History] = {}

    @property
    def hold_rate(self) -> Decimal:
        # Bitvavo reserves at the taker rate; max() keeps the hold sufficient if maker > taker.
        return max(self.fees.taker, self.fees.maker)


class _Call:
    """What one engine call changed; becomes its MatchResult."""

    __slots__ = ("fills", "levels", "maker_fills", "now", "touched", "trades")

    def __init__(self, now: int) -> None:
        self.now = now
        self.fills: list[Fill] = []
        self.maker_fills: list[Fill] = []
        self.touched: dict[str, Order] = {}
        self.trades: list[Trade] = []
        # dict keeps first-occurrence order while later writes collapse to the final size.
        self.levels: dict[tuple[Side, Decimal], Decimal] = {}

    def level(self, side: Side, price: Decimal, size: Decimal) -> None:
        self.levels[(side, price)] = size

    def touch(self, order: Order) -> None:
        self.touched[order.order_id] = order

    def result(self, order: Order) -> MatchResult:
        self.touched.pop(order.order_id, None)
        return MatchResult(
            order=order, fills=self.fills, maker_fills=self.maker_fills,
            touched_orders=list(self.touched.values()), trades=self.trades,
            level_changes=[LevelChange(side, price, size) for (side, price), size in self.levels.items()])


class MatchingEngine:
    """Books, accounts and orders of one exchange (or of one paper-trading mirror).

    Unknown accounts raise KeyError (the caller maps API keys to accounts; an unknown one is a
    programming error). Unknown markets raise error 205. Per account and market the newest
    `history_limit` closed orders and fills are kept; open orders are always kept.
    """

    def __init__(self, markets: Iterable[MarketRules], *, clock: Callable[[], int],
                 id_factory: Callable[[], str], history_limit: int = 10_000) -> None:
        self._books = {rules.market: _Book(rules) for rules in markets}
        self._clock = clock
        self._new_id = id_factory
        self._history_limit = history_limit
        self._accounts: dict[str, _Account] = {}
        self._symbols = sorted({sym for book in self._books.values()
                                for sym in (book.rules.base, book.rules.quote)})
        # The exchange's own account: fees collected (negative maker fees are rebates paid from it).
        self._fee_pool = dict.fromkeys(self._symbols, ZERO)

    # accounts
    def open_account(self, account_id: str, balances: dict[str, Decimal], fees: FeeRates,
                     *, unlimited: bool = False) -> None:
        if account_id in self._accounts:
            raise ValueError(f"account {account_id!r} already exists")
        available = dict.fromkeys(self._symbols, ZERO)
        available.update(balances)
        self._accounts[account_id] = _Account(account_id, available, fees, unlimited)

    def balances(self, account_id: str) -> dict[str, Balance]:
        acct = self._account(account_id)
        return {sym: Balance(sym, amount, acct.in_order.get(sym, ZERO))
                for sym, amount in acct.available.items()}

    def fees(self, account_id: str) -> FeeRates:
        return self._account(account_id).fees

    def collected_fees(self) -> dict[str, Decimal]:
        """Fees the exchange collected per symbol (its side of the conservation ledger)."""
        return dict(self._fee_pool)

    # markets
    def rules(self, market: str) -> MarketRules:
        return self._book(market).rules

    def set_market_status(self, market: str, status: str) -> None:
        if status not in MARKET_STATUSES:
            raise ValueError(f"unknown market status {status!r}")
        book = self._book(market)
        book.rules = dataclasses.replace(book.rules, status=status)

    def depth(self, market: str, limit: int | None = None
              ) -> tuple[list[tuple[Decimal, Decimal]], list[tuple[Decimal, Decimal]]]:
        """Aggregated (price, size) levels: bids best-first descending, asks ascending."""
        book = self._book(market)
        bids = [(price, level.total) for price, level in islice(reversed(book.bids.items()), limit)]
        asks = [(price, level.total) for price, level in islice(book.asks.items(), limit)]
        return bids, asks

    def best_bid(self, market: str) -> tuple[Decimal, Decimal] | None:
        bids = self._book(market).bids
        if not bids:
            return None
        price, level = bids.peekitem(-1)
        return price, level.total

    def best_ask(self, market: str) -> tuple[Decimal, Decimal] | None:
        asks = self._book(market).asks
        if not asks:
            return None
        price, level = asks.peekitem(0)
        return price, level.total

    # orders
    def place(self, account_id: str, request: OrderRequest) -> MatchResult:
        acct = self._account(account_id)
        book = self._book(request.market)
        rules = book.rules
        self._check_status_for_create(rules, request.order_type)
        if request.order_type not in rules.order_types or request.order_type not in ("market", "limit"):
            raise _error(205, "orderType parameter is invalid.")
        self._check_params(request, rules)
        if (rules.status == "auction" and request.price is not None
                and self._crosses(book, request.side, request.price)):
            raise _error(425)  # no matching during an auction
        self._check_size(book, request)
        hist = self._history(acct, request.market)
        if not acct.unlimited and len(hist.open) >= rules.max_open_orders:
            raise _error(235, f"You can only have {rules.max_open_orders} open orders in each market.")
        hold = self._initial_hold(book, acct, request)
        self._check_funds(acct, rules.quote if request.side == "buy" else rules.base, hold)
        coid = request.client_order_id
        if coid is not None and (prior := hist.by_client_id.get(coid)) is not None and prior.is_open:
            raise _error(220)

        call = _Call(self._clock())
        is_limit = request.order_type == "limit"
        order = Order(
            order_id=self._new_id(), account_id=account_id, market=request.market, side=request.side,
            order_type=request.order_type, created=call.now, updated=call.now, status="new",
            amount=request.amount, amount_remaining=request.amount,
            amount_quote=request.amount_quote, amount_quote_remaining=request.amount_quote,
            price=request.price if is_limit else None, on_hold=ZERO,
            on_hold_currency=rules.quote if request.side == "buy" else rules.base,
            filled_amount=ZERO, filled_amount_quote=ZERO, fee_paid=ZERO, fee_currency=rules.quote,
            time_in_force=request.time_in_force if is_limit else None,
            post_only=request.post_only if is_limit else None,
            self_trade_prevention=request.self_trade_prevention, visible=is_limit,
            client_order_id=coid, operator_id=request.operator_id)
        self._register(acct, order)
        self._set_hold(acct, order, hold)
        self._execute(call, book, acct, order)
        return call.result(order)

    def update(self, account_id: str, market: str, changes: OrderUpdate, *,
               order_id: str | None = None, client_order_id: str | None = None) -> MatchResult:
        acct = self._account(account_id)
        book = self._book(market)
        rules = book.rules
        self._check_status_for_create(rules, "limit")
        order = self._find(acct, market, order_id, client_order_id)
        if order.order_type == "market":
            raise _error(234)
        if not order.is_open:
            raise _error(233)
        if changes.amount is not None and changes.amount_remaining is not None:
            raise _error(236)
        old_amount, old_remaining, old_price = order.amount, _remaining(order), order.price
        assert old_amount is not None and old_price is not None  # limit orders carry both
        # What was consumed (fills, self-trade decrements) stays consumed whichever field is sent.
        consumed = old_amount - old_remaining
        if changes.amount is not None:
            self._check_amount("amount", changes.amount, rules)
            new_amount = changes.amount
        elif changes.amount_remaining is not None:
            self._check_amount("amountRemaining", changes.amount_remaining, rules)
            new_amount = consumed + changes.amount_remaining
        else:
            new_amount = old_amount
        new_remaining = new_amount - consumed
        if new_remaining <= 0:
            raise _invalid("amount", new_amount)
        new_price = old_price
        if changes.price is not None:
            self._check_price(changes.price, rules)
            new_price = changes.price
        new_tif = order.time_in_force if changes.time_in_force is None else changes.time_in_force
        if new_tif not in _TIME_IN_FORCE:
            raise _invalid("timeInForce", new_tif)
        new_post_only = order.post_only if changes.post_only is None else changes.post_only
        new_stp = (order.self_trade_prevention if changes.self_trade_prevention is None
                   else changes.self_trade_prevention)
        if new_stp not in _STP_MODES:
            raise _invalid("selfTradePrevention", new_stp)
        new_operator = order.operator_id if changes.operator_id is None else changes.operator_id
        if (new_amount == old_amount and new_price == old_price and new_tif == order.time_in_force
                and new_post_only == order.post_only and new_stp == order.self_trade_prevention
                and new_operator == order.operator_id):
            raise _error(232)
        self._check_notional("amount", new_amount, new_amount * new_price, rules)
        if rules.status == "auction":
            if new_tif != "GTC":
                raise _error(231)
            if self._crosses(book, order.side, new_price):
                raise _error(425)
        target = self._order_hold(acct, order, new_remaining, new_price, rules)
        self._check_funds(acct, order.on_hold_currency, target - order.on_hold)

        call = _Call(self._clock())
        order.updated = call.now
        order.time_in_force, order.post_only = new_tif, new_post_only
        order.self_trade_prevention, order.operator_id = new_stp, new_operator
        if new_price == old_price and new_remaining <= old_remaining and new_tif == "GTC":
            # Same price, not bigger: keeps its place in the queue.
            order.amount, order.amount_remaining = new_amount, new_remaining
            if new_remaining != old_remaining:
                level = book.levels(order.side)[old_price]
                level.total -= old_remaining - new_remaining
                call.level(order.side, old_price, level.total)
            self._set_hold(acct, order, target)
        else:
            # Pulled and re-entered as a new incoming order: loses priority, may cross and trade.
            self._unrest(call, book, order)
            order.amount, order.amount_remaining, order.price = new_amount, new_remaining, new_price
            self._set_hold(acct, order, target)
            self._execute(call, book, acct, order)
        return call.result(order)

    def cancel(self, account_id: str, market: str, *, order_id: str | None = None,
               client_order_id: str | None = None) -> MatchResult:
        acct = self._account(account_id)
        book = self._book(market)
        if book.rules.status == "halted":
            raise _error(423)
        order = self._find(acct, market, order_id, client_order_id)
        if not order.is_open:
            raise _error(240)
        call = _Call(self._clock())
        self._cancel(call, book, acct, order, "canceled")
        return call.result(order)

    def cancel_all(self, account_id: str, market: str | None = None) -> list[MatchResult]:
        """Cancel the account's open orders in `market`, or in every market that is not halted."""
        acct = self._account(account_id)
        if market is not None and self._book(market).rules.status == "halted":
            raise _error(423)
        markets = [market] if market is not None else list(acct.history)
        results = []
        now = self._clock()
        for name in markets:
            book = self._book(name)
            hist = acct.history.get(name)
            if hist is None or book.rules.status == "halted":
                continue
            for order in reversed(list(hist.open.values())):
                call = _Call(now)
                self._cancel(call, book, acct, order, "canceled")
                results.append(call.result(order))
        return results

    def set_liquidity_level(self, account_id: str, market: str, side: Side, price: Decimal,
                            size: Decimal) -> MatchResult | None:
        """Make `account_id`'s resting size at `price` equal `size` (paper mirrors of an external book,
        the simulator's market maker). If the level crosses other accounts' resting orders it trades
        against them first. Returns None when nothing changed."""
        acct = self._account(account_id)
        book = self._book(market)
        rules = book.rules
        if side not in _SIDES:
            raise _invalid("side", side)
        self._check_price(price, rules)
        if size < 0:
            raise _invalid("amount", size)
        if decimal_places(size) > rules.quantity_decimals:
            raise self._too_many_decimals("amount", size)
        level = book.levels(side).get(price)
        own = list(level.by_account.get(account_id, ())) if level is not None else []
        current = sum((_remaining(order) for order in own), ZERO)
        if size == current:
            return None
        if size < current:
            if rules.status == "halted":
                raise _error(423)
            return self._shrink_level(book, acct, own, current - size)
        self._check_status_for_create(rules, "limit")
        delta = size - current
        if own:
            return self._grow_level(book, acct, own[-1], delta)
        if rules.status == "auction" and self._crosses(book, side, price):
            raise _error(425)
        if not acct.unlimited and len(self._history(acct, market).open) >= rules.max_open_orders:
            raise _error(235, f"You can only have {rules.max_open_orders} open orders in each market.")
        hold = self._resting_hold(acct, side, delta, price, rules)
        self._check_funds(acct, rules.quote if side == "buy" else rules.base, hold)
        call = _Call(self._clock())
        order = Order(
            order_id=self._new_id(), account_id=account_id, market=market, side=side,
            order_type="limit", created=call.now, updated=call.now, status="new",
            amount=delta, amount_remaining=delta, amount_quote=None, amount_quote_remaining=None,
            price=price, on_hold=ZERO, on_hold_currency=rules.quote if side == "buy" else rules.base,
            filled_amount=ZERO, filled_amount_quote=ZERO, fee_paid=ZERO, fee_currency=rules.quote,
            time_in_force="GTC", post_only=False,
            # A mirrored level replaces the account's own stale quotes that it crosses.
            self_trade_prevention="cancelOldest", visible=True)
        self._register(acct, order)
        self._set_hold(acct, order, hold)
        self._execute(call, book, acct, order)
        return call.result(order)

    def get_order(self, account_id: str, market: str, *, order_id: str | None = None,
                  client_order_id: str | None = None) -> Order:
        acct = self._account(account_id)
        self._book(market)
        return self._find(acct, market, order_id, client_order_id)

    def orders(self, account_id: str, market: str) -> list[Order]:
        """All orders of the account in `market`, newest first."""
        acct = self._account(account_id)
        self._book(market)
        hist = acct.history.get(market)
        return list(reversed(hist.orders.values())) if hist is not None else []

    def open_orders(self, account_id: str, market: str | None = None) -> list[Order]:
        """Newest first."""
        acct = self._account(account_id)
        if market is not None:
            self._book(market)
            hist = acct.history.get(market)
            return list(reversed(hist.open.values())) if hist is not None else []
        found = [order for hist in acct.history.values() for order in reversed(hist.open.values())]
        found.sort(key=lambda order: order.created, reverse=True)  # stable: ties stay newest first
        return found

    def account_fills(self, account_id: str, market: str) -> list[Fill]:
        """The account's fills in `market`, newest first."""
        acct = self._account(account_id)
        self._book(market)
        hist = acct.history.get(market)
        return list(reversed(hist.fills)) if hist is not None else []

    # lookups
    def _account(self, account_id: str) -> _Account:
        acct = self._accounts.get(account_id)
        if acct is None:
            raise KeyError(f"unknown account {account_id!r}")
        return acct

    def _book(self, market: str) -> _Book:
        book = self._books.get(market)
        if book is None:
            raise _invalid("market", market)
        return book

    def _history(self, acct: _Account, market: str) -> _History:
        hist = acct.history.get(market)
        if hist is None:
            hist = acct.history[market] = _History(self._history_limit)
        return hist

    def _find(self, acct: _Account, market: str, order_id: str | None,
              client_order_id: str | None) -> Order:
        if order_id is None and client_order_id is None:
            raise _error(203, "orderId parameter is required.")
        hist = acct.history.get(market)
        order = None
        if hist is not None:
            order = (hist.orders.get(order_id) if order_id is not None
                     else hist.by_client_id.get(client_order_id or ""))
        if order is None:
            raise _error(240)
        return order

    # validation
    @staticmethod
    def _check_status_for_create(rules: MarketRules, order_type: str) -> None:
        status = rules.status
        if status == "halted":
            raise _error(423)
        if status == "cancelOnly":
            raise _error(424)
        if status == "auctionMatching":
            raise _error(426)
        if status == "auction" and order_type == "market":
            raise _error(425)

    def _check_params(self, request: OrderRequest, rules: MarketRules) -> None:
        if request.side not in _SIDES:
            raise _invalid("side", request.side)
        if request.time_in_force not in _TIME_IN_FORCE:
            raise _invalid("timeInForce", request.time_in_force)
        if request.self_trade_prevention not in _STP_MODES:
            raise _invalid("selfTradePrevention", request.self_trade_prevention)
        if request.amount is not None and request.amount_quote is not None:
            raise _error(206)
        kind = request.order_type
        if kind == "limit":
            if request.amount_quote is not None:
                raise _error(202, "amountQuote parameter is not allowed for orderType limit.")
            if request.amount is None:
                raise _error(203, "amount parameter is required.")
            if request.price is None:
                raise _error(203, "price parameter is required.")
        else:
            for param, present in (("price", request.price is not None),
                                   ("timeInForce", request.time_in_force != "GTC"),
                                   ("postOnly", request.post_only)):
                if present:
                    raise _error(202, f"{param} parameter is not allowed for orderType market.")
            if request.amount is None and request.amount_quote is None:
                raise _error(203, "amount or amountQuote parameter is required.")
        if rules.status == "auction" and request.time_in_force != "GTC":
            raise _error(231)
        if request.price is not None:
            self._check_price(request.price, rules)
        if request.amount is not None:
            self._check_amount("amount", request.amount, rules)
        if request.amount_quote is not None:
            if request.amount_quote <= 0:
                raise _invalid("amountQuote", request.amount_quote)
            if decimal_places(request.amount_quote) > rules.notional_decimals:
                raise self._too_many_decimals("amountQuote", request.amount_quote)

    def _check_price(self, price: Decimal, rules: MarketRules) -> None:
        if price <= 0:
            raise _invalid("price", price)
        if price.adjusted() >= MAGNITUDE_LIMIT_EXPONENT:
            raise _error(211)
        if price % rules.tick_size != 0:
            raise _error(422, f"price parameter {format_decimal(price)} is not a multiple of "
                              f"tickSize {format_decimal(rules.tick_size)}.")

    def _check_amount(self, param: str, amount: Decimal, rules: MarketRules) -> None:
        if amount <= 0:
            raise _invalid(param, amount)
        if amount.adjusted() >= MAGNITUDE_LIMIT_EXPONENT:
            raise _error(210)
        if decimal_places(amount) > rules.quantity_decimals:
            raise self._too_many_decimals(param, amount)

    @staticmethod
    def _too_many_decimals(param: str, value: Decimal) -> BitvavoError:
        return _error(429, f"{param} parameter {format_decimal(value)} has too many decimals "
                           "for this market.")

    def _check_size(self, book: _Book, request: OrderRequest) -> None:
        """Min/max size in base and in quote. The quote size (notional) of an order by `amount`
        is amount x its limit price, or for a market order amount x the best opposite price
        (what its first fill would trade at). With no opposite side it cannot be valued, and the
        quote check is skipped: such an order trades nothing (canceledMarketProtection), while
        any stand-in price (a last trade) would be one the paper mirror does not have."""
        rules = book.rules
        if request.amount_quote is not None:
            self._check_notional("amountQuote", None, request.amount_quote, rules)
        elif request.amount is not None:
            price = request.price
            if price is None:
                opposite = book.asks if request.side == "buy" else book.bids
                if opposite:
                    price = opposite.peekitem(0 if request.side == "buy" else -1)[0]
            notional = request.amount * price if price is not None else None
            self._check_notional("amount", request.amount, notional, rules)

    @staticmethod
    def _check_notional(param: str, amount: Decimal | None, notional: Decimal | None,
                        rules: MarketRules) -> None:
        if amount is not None:
            if amount > rules.max_order_base:
                raise _error(210, f"{param} parameter {format_decimal(amount)} exceeds the maximum "
                                  f"order size of {format_decimal(rules.max_order_base)} {rules.base}.")
            if amount < rules.min_order_base:
                raise _error(212, f"{param} parameter {format_decimal(amount)} is below the minimum "
                                  f"order size of {format_decimal(rules.min_order_base)} {rules.base}.")
        if notional is not None:
            if notional > rules.max_order_quote:
                raise _error(210, f"{param} parameter exceeds the maximum order size of "
                                  f"{format_decimal(rules.max_order_quote)} {rules.quote}.")
            if notional < rules.min_order_quote:
                raise _error(217, "Minimum order size in quote currency is "
                                  f"{format_decimal(rules.min_order_quote)} {rules.quote}.")

    @staticmethod
    def _check_funds(acct: _Account, symbol: str, needed: Decimal) -> None:
        if not acct.unlimited and needed > 0 and needed > acct.available[symbol]:
            raise _error(216)

    # holds
    @staticmethod
    def _resting_hold(acct: _Account, side: str, remaining: Decimal, price: Decimal,
                      rules: MarketRules, basis: Decimal = ZERO) -> Decimal:
        """What the rest of an order can still cost. A buy's fills are debited by cumulative
        rounding (_settle), so with `basis` (its fee basis so far) filling `remaining` at `price`
        costs at most ceil(basis + remaining*price*(1+rate)) - ceil(basis); with no fills yet
        that is spec §5.5's ceil(amount*price*(1+rate))."""
        if side == "sell":
            return remaining
        places = rules.notional_decimals
        return (ceil_to(basis + remaining * price * (1 + acct.hold_rate), places)
                - ceil_to(basis, places))

    def _order_hold(self, acct: _Account, order: Order, remaining: Decimal, price: Decimal,
                    rules: MarketRules) -> Decimal:
        """_resting_hold for an existing order, after the fills it already has."""
        return self._resting_hold(acct, order.side, remaining, price, rules,
                                  self._fee_basis(acct, order))

    @staticmethod
    def _fee_basis(acct: _Account, order: Order) -> Decimal:
        hist = acct.history.get(order.market)
        return hist.fee_basis.get(order.order_id, ZERO) if hist is not None else ZERO

    def _initial_hold(self, book: _Book, acct: _Account, request: OrderRequest) -> Decimal:
        rules = book.rules
        if request.price is not None:
            assert request.amount is not None  # checked in _check_params
            return self._resting_hold(acct, request.side, request.amount, request.price, rules)
        if request.side == "sell" and request.amount is not None:
            return request.amount
        if request.side == "buy" and request.amount_quote is not None:
            return request.amount_quote
        # Market buy by amount / sell by amountQuote: what walking the book would take. Own orders
        # are skipped: self-trade prevention can only make the real walk cheaper.
        rate = acct.fees.taker
        held = ZERO
        if request.side == "buy":
            need = request.amount or ZERO
            for price, resting in self._walk(book, "buy", acct.account_id):
                qty = min(need, _remaining(resting))
                held += qty * price * (1 + rate)
                need -= qty
                if need == 0:
                    break
            # The fills' debits add up to ceil(sum of gross*(1+rate)) (cumulative rounding).
            return ceil_to(held, rules.notional_decimals)
        budget = request.amount_quote or ZERO
        for price, resting in self._walk(book, "sell", acct.account_id):
            qty = min(floor_to(budget / price, rules.quantity_decimals), _remaining(resting))
            if qty <= 0:
                break
            held += qty
            budget -= qty * price
        return held

    def _set_hold(self, acct: _Account, order: Order, target: Decimal) -> None:
        """Move funds between available and this order's hold so the hold equals `target`."""
        symbol = order.on_hold_currency
        delta = target - order.on_hold
        if delta > 0 and not acct.unlimited and delta > acct.available[symbol]:
            # Callers check funds before growing a hold; fills only ever shrink it.
            raise AssertionError(f"order {order.order_id} would overdraw {symbol} of account "
                                 f"{acct.account_id}: hold {target} needs {delta} more")
        if delta:
            acct.available[symbol] -= delta
            acct.in_order[symbol] += delta
            order.on_hold += delta

    def _debit(self, acct: _Account, order: Order, symbol: str, amount: Decimal) -> None:
        """Pay `amount` of `symbol`: from the order's hold first, the rest from available."""
        from_hold = min(order.on_hold, amount)
        rest = amount - from_hold
        if rest > 0 and not acct.unlimited and rest > acct.available[symbol]:
            # Holds cover every fill (cumulative fee rounding, _settle); reaching this is a bug.
            raise AssertionError(f"order {order.order_id} would overdraw {symbol} of account "
                                 f"{acct.account_id}: needs {rest} beyond its hold")
        order.on_hold -= from_hold
        acct.in_order[symbol] -= from_hold
        acct.available[symbol] -= rest

    # order lifecycle
    def _register(self, acct: _Account, order: Order) -> None:
        hist = self._history(acct, order.market)
        hist.orders[order.order_id] = order
        hist.open[order.order_id] = order
        if order.client_order_id is not None:
            hist.by_client_id[order.client_order_id] = order

    def _close(self, acct: _Account, order: Order, status: str, now: int) -> None:
        order.status = status
        order.updated = now
        self._set_hold(acct, order, ZERO)
        hist = acct.history[order.market]
        del hist.open[order.order_id]
        hist.fee_basis.pop(order.order_id, None)
        hist.closed.append(order)
        if len(hist.closed) > self._history_limit:
            old = hist.closed.popleft()
            del hist.orders[old.order_id]
            if old.client_order_id is not None and hist.by_client_id.get(old.client_order_id) is old:
                del hist.by_client_id[old.client_order_id]

    def _cancel(self, call: _Call, book: _Book, acct: _Account, order: Order, status: str) -> None:
        self._unrest(call, book, order)
        self._close(acct, order, status, call.now)

    def _rest(self, call: _Call, book: _Book, order: Order) -> None:
        price = _limit_price(order)
        levels = book.levels(order.side)
        level = levels.get(price)
        if level is None:
            level = levels[price] = _Level()
        level.orders.append(order)
        level.by_account.setdefault(order.account_id, []).append(order)
        level.total += _remaining(order)
        call.level(order.side, price, level.total)

    def _unrest(self, call: _Call, book: _Book, order: Order) -> None:
        price = _limit_price(order)
        levels = book.levels(order.side)
        level = levels[price]
        _remove_identical(level.orders, order)
        own = level.by_account[order.account_id]
        _remove_identical(own, order)
        if not own:
            del level.by_account[order.account_id]
        level.total -= _remaining(order)
        if not level.orders:
            del levels[price]
        call.level(order.side, price, level.total)

    # matching
    @staticmethod
    def _crosses(book: _Book, side: str, price: Decimal) -> bool:
        if side == "buy":
            return bool(book.asks) and book.asks.peekitem(0)[0] <= price
        return bool(book.bids) and book.bids.peekitem(-1)[0] >= price

    @staticmethod
    def _walk(book: _Book, taker_side: str, skip_account: str | None = None
              ) -> Iterator[tuple[Decimal, Order]]:
        """Resting orders a `taker_side` order would meet, in priority order (read-only)."""
        levels = book.asks if taker_side == "buy" else book.bids
        prices = iter(levels.keys()) if taker_side == "buy" else reversed(levels.keys())
        for price in prices:
            for resting in levels[price].orders:
                if resting.account_id != skip_account:
                    yield price, resting

    def _fok_fillable(self, book: _Book, order: Order) -> bool:
        """FOK fills completely, without any self-trade on the way, or not at all."""
        need = _remaining(order)
        limit = _limit_price(order)
        for price, resting in self._walk(book, order.side):
            if (price > limit) if order.side == "buy" else (price < limit):
                return False
            if resting.account_id == order.account_id:
                return False
            need -= min(need, _remaining(resting))
            if need == 0:
                return True
        return False

    def _execute(self, call: _Call, book: _Book, acct: _Account, order: Order) -> None:
        """Run an incoming (new or re-entered) order against the book; rest or close it."""
        rules = book.rules
        if order.post_only and order.price is not None and self._crosses(book, order.side, order.price):
            self._close(acct, order, "canceledPostOnly", call.now)
            return
        if order.time_in_force == "FOK" and not self._fok_fillable(book, order):
            self._close(acct, order, "canceledFOK", call.now)
            return
        stop = self._match(call, book, acct, order)
        if stop == "stp":
            self._close(acct, order, _STP_CANCELED, call.now)
        elif order.amount_remaining == 0:
            self._close(acct, order, "filled", call.now)
        elif order.order_type == "market":
            # Dust left of an amountQuote budget counts as filled; an exhausted book does not.
            done = stop == "budget" and order.filled_amount > 0
            self._close(acct, order, "filled" if done else "canceledMarketProtection", call.now)
        elif order.time_in_force != "GTC":
            self._close(acct, order, "canceledIOC" if order.time_in_force == "IOC" else "canceledFOK",
                        call.now)
        else:
            order.status = "new" if order.filled_amount == 0 else "partiallyFilled"
            self._set_hold(acct, order, self._order_hold(acct, order, _remaining(order),
                                                        _limit_price(order), rules))
            self._rest(call, book, order)

    def _capacity(self, acct: _Account, order: Order, price: Decimal, rate: Decimal,
                  rules: MarketRules) -> Decimal:
        """Base amount the taker can still take at `price`."""
        if order.amount_remaining is not None:
            return order.amount_remaining
        budget = order.amount_quote_remaining or ZERO
        if order.side == "sell":
            return floor_to(budget / price, rules.quantity_decimals)
        # A fill costs ceil(basis + qty*price*(1+rate)) - ceil(basis) (_settle); the budget sits on
        # the notional grid, so that is <= budget exactly when basis + qty*price*(1+rate) <=
        # budget + ceil(basis).
        basis = self._fee_basis(acct, order)
        room = budget + ceil_to(basis, rules.notional_decimals) - basis
        return floor_to(room / (price * (1 + rate)), rules.quantity_decimals)

    def _match(self, call: _Call, book: _Book, acct: _Account, order: Order) -> str:
        """Take liquidity until done; returns why it stopped: budget, limit, exhausted or stp."""
        rules = book.rules
        buying = order.side == "buy"
        opposite = book.asks if buying else book.bids
        best = 0 if buying else -1
        rate = acct.fees.taker
        limit = order.price
        while opposite:
            price, level = opposite.peekitem(best)
            if limit is not None and (price > limit if buying else price < limit):
                return "limit"
            capacity = self._capacity(acct, order, price, rate, rules)
            if capacity <= 0:
                return "budget"
            maker = level.orders[0]
            if maker.account_id == order.account_id:
                if not self._prevent_self_trade(call, book, acct, order, maker, capacity, price):
                    return "stp"
                continue
            self._trade(call, book, acct, order, maker, min(capacity, _remaining(maker)), price)
        return "exhausted"

    def _prevent_self_trade(self, call: _Call, book: _Book, acct: _Account, order: Order,
                            maker: Order, capacity: Decimal, price: Decimal) -> bool:
        """Apply the taker's selfTradePrevention; True when the taker goes on matching."""
        mode = order.self_trade_prevention
        if mode == "cancelNewest":
            return False
        if mode in ("cancelOldest", "cancelBoth"):
            self._cancel(call, book, acct, maker, _STP_CANCELED)
            call.touch(maker)
            return mode == "cancelOldest"
        # decrementAndCancel: both shrink by the overlap; the smaller one (or both) is cancelled.
        maker_left = _remaining(maker)
        overlap = min(capacity, maker_left)
        if overlap == maker_left:
            self._cancel(call, book, acct, maker, _STP_CANCELED)
        else:
            level = book.levels(maker.side)[price]
            level.total -= overlap
            maker.amount_remaining = maker_left - overlap
            maker.updated = call.now
            call.level(maker.side, price, level.total)
            self._set_hold(acct, maker, self._order_hold(acct, maker, maker.amount_remaining,
                                                        price, book.rules))
        call.touch(maker)
        if capacity <= maker_left:
            return False
        if order.amount_remaining is not None:
            order.amount_remaining -= overlap
        else:
            budget = order.amount_quote_remaining or ZERO
            spent = overlap * price
            if order.side == "buy":
                # Priced like a fill would have been (cumulative rounding); fits the budget.
                places = book.rules.notional_decimals
                basis = self._fee_basis(acct, order)
                spent = (ceil_to(basis + spent * (1 + acct.fees.taker), places)
                         - ceil_to(basis, places))
            order.amount_quote_remaining = budget - spent
        return True

    def _trade(self, call: _Call, book: _Book, taker_acct: _Account, taker: Order, maker: Order,
               qty: Decimal, price: Decimal) -> None:
        rules = book.rules
        maker_acct = self._accounts[maker.account_id]
        trade_id = self._new_id()  # one id for the public trade and both fills
        call.fills.append(self._settle(call, taker_acct, taker, qty, price, True, trade_id, rules))
        call.maker_fills.append(self._settle(call, maker_acct, maker, qty, price, False, trade_id, rules))
        call.trades.append(Trade(trade_id, rules.market, qty, price, taker.side, call.now))
        levels = book.levels(maker.side)
        level = levels[price]
        level.total -= qty
        if maker.amount_remaining == 0:
            level.orders.popleft()
            own = level.by_account[maker.account_id]
            _remove_identical(own, maker)
            if not own:
                del level.by_account[maker.account_id]
            if not level.orders:
                del levels[price]
            self._close(maker_acct, maker, "filled", call.now)
        else:
            maker.status = "partiallyFilled"
            self._set_hold(maker_acct, maker, self._order_hold(maker_acct, maker, _remaining(maker),
                                                              price, rules))
        call.level(maker.side, price, level.total)
        call.touch(maker)

    def _settle(self, call: _Call, acct: _Account, order: Order, qty: Decimal, price: Decimal,
                taker: bool, fill_id: str, rules: MarketRules) -> Fill:
        """Book one side of a fill. Fees in quote, rounded so quote balances stay on the
        notional grid (spec §5.6): sells get floor(gross*(1-rate)), buys pay ceil(gross*(1+rate)).

        Rounding is cumulative per order, so an order's fills together move exactly what one fill
        of their combined size would (and a buy never pays more than its hold): with B the order's
        fee basis (sum of gross*(1+rate), or *(1-rate) for sells, over its fills, each at the rate
        of its own role), fill k pays ceil(B_k) - ceil(B_k-1) / gets floor(B_k) - floor(B_k-1).
        A single fill is exactly spec §5.6; a later fill's own fee may differ from its isolated
        rounding by under a cent, so a fill whose gross is off the cent grid can show a slightly
        negative fee (the order's total fee is >= 0 for non-negative rates)."""
        rate = acct.fees.taker if taker else acct.fees.maker
        gross = qty * price
        places = rules.notional_decimals
        fee_basis = acct.history[order.market].fee_basis
        basis = fee_basis.get(order.order_id, ZERO)
        if order.side == "sell":
            new_basis = basis + gross * (1 - rate)
            net = floor_to(new_basis, places) - floor_to(basis, places)
            fee = gross - net
            self._debit(acct, order, rules.base, qty)
            acct.available[rules.quote] += net
            spent_quote = gross
        else:
            new_basis = basis + gross * (1 + rate)
            total = ceil_to(new_basis, places) - ceil_to(basis, places)
            fee = total - gross
            self._debit(acct, order, rules.quote, total)
            acct.available[rules.base] += qty
            spent_quote = total
        fee_basis[order.order_id] = new_basis
        self._fee_pool[rules.quote] += fee
        order.filled_amount += qty
        order.filled_amount_quote += gross
        order.fee_paid += fee
        if order.amount_remaining is not None:
            order.amount_remaining -= qty
        if order.amount_quote_remaining is not None:
            order.amount_quote_remaining -= spent_quote
        order.updated = call.now
        fill = Fill(fill_id=fill_id, order_id=order.order_id, account_id=acct.account_id,
                    market=rules.market, side=order.side, amount=qty, price=price, taker=taker,
                    fee=fee, fee_currency=rules.quote, timestamp=call.now,
                    client_order_id=order.client_order_id)
        order.fills.append(fill)
        acct.history[order.market].fills.append(fill)
        return fill

    # liquidity levels
    def _shrink_level(self, book: _Book, acct: _Account, own: list[Order], cut: Decimal) -> MatchResult:
        """Take `cut` off the account's orders at one level, newest first (they have least priority)."""
        call = _Call(self._clock())
        changed: list[Order] = []
        for order in reversed(own):
            left = _remaining(order)
            if cut >= left:
                self._cancel(call, book, acct, order, "canceled")
                cut -= left
            else:
                assert order.amount is not None and order.price is not None
                level = book.levels(order.side)[order.price]
                level.total -= cut
                order.amount -= cut
                order.amount_remaining = left - cut
                order.updated = call.now
                call.level(order.side, order.price, level.total)
                self._set_hold(acct, order, self._order_hold(acct, order, order.amount_remaining,
                                                            order.price, book.rules))
                cut = ZERO
            changed.append(order)
            if cut == 0:
                break
        for order in changed[1:]:
            call.touch(order)
        return call.result(changed[0])

    def _grow_level(self, book: _Book, acct: _Account, order: Order, delta: Decimal) -> MatchResult:
        """Add `delta` to the account's newest order at the level; the increase loses priority."""
        price = order.price
        assert order.amount is not None and price is not None
        new_remaining = _remaining(order) + delta
        target = self._order_hold(acct, order, new_remaining, price, book.rules)
        self._check_funds(acct, order.on_hold_currency, target - order.on_hold)
        call = _Call(self._clock())
        level = book.levels(order.side)[price]
        at_tail = level.orders[-1] is order
        if not at_tail:
            self._unrest(call, book, order)
        order.amount += delta
        order.amount_remaining = new_remaining
        order.updated = call.now
        if at_tail:
            level.total += delta
            call.level(order.side, price, level.total)
        else:
            self._rest(call, book, order)
        self._set_hold(acct, order, target)
        return call.result(order)


def _remove_identical(items: deque[Order] | list[Order], order: Order) -> None:
    # By identity: Order's dataclass __eq__ compares every field, which is slow and not identity.
    for index, item in enumerate(items):
        if item is order:
            del items[index]
            return
    raise AssertionError(f"order {order.order_id} is not on its level")
