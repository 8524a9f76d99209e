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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

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
        raise NotImplementedError


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
        raise NotImplementedError


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


class MatchingEngine:
    def __init__(self, markets: Iterable[MarketRules], *, clock: Callable[[], int],
                 id_factory: Callable[[], str]) -> None:
        raise NotImplementedError

    # accounts
    def open_account(self, account_id: str, balances: dict[str, Decimal], fees: FeeRates,
                     *, unlimited: bool = False) -> None:
        raise NotImplementedError

    def balances(self, account_id: str) -> dict[str, Balance]:
        raise NotImplementedError

    def fees(self, account_id: str) -> FeeRates:
        raise NotImplementedError

    # markets
    def rules(self, market: str) -> MarketRules:
        raise NotImplementedError

    def set_market_status(self, market: str, status: str) -> None:
        raise NotImplementedError

    def depth(self, market: str, limit: int | None = None
              ) -> tuple[list[tuple[Decimal, Decimal]], list[tuple[Decimal, Decimal]]]:
        """Aggregated (price, size) levels: bids best-first descending, asks ascending."""
        raise NotImplementedError

    def best_bid(self, market: str) -> tuple[Decimal, Decimal] | None:
        raise NotImplementedError

    def best_ask(self, market: str) -> tuple[Decimal, Decimal] | None:
        raise NotImplementedError

    # orders
    def place(self, account_id: str, request: OrderRequest) -> MatchResult:
        raise NotImplementedError

    def update(self, account_id: str, market: str, changes: OrderUpdate, *,
               order_id: str | None = None, client_order_id: str | None = None) -> MatchResult:
        raise NotImplementedError

    def cancel(self, account_id: str, market: str, *, order_id: str | None = None,
               client_order_id: str | None = None) -> MatchResult:
        raise NotImplementedError

    def cancel_all(self, account_id: str, market: str | None = None) -> list[MatchResult]:
        raise NotImplementedError

    def set_liquidity_level(self, account_id: str, market: str, side: Side, price: Decimal,
                            size: Decimal) -> MatchResult | None:
        """Make `account_id`'s resting size at `price` equal `size` (paper mirrors of an external book,
        the simulator's market maker). If the level crosses other accounts' resting orders it trades
        against them first. Returns None when nothing changed."""
        raise NotImplementedError

    def get_order(self, account_id: str, market: str, *, order_id: str | None = None,
                  client_order_id: str | None = None) -> Order:
        raise NotImplementedError

    def orders(self, account_id: str, market: str) -> list[Order]:
        """All orders of the account in `market`, newest first."""
        raise NotImplementedError

    def open_orders(self, account_id: str, market: str | None = None) -> list[Order]:
        raise NotImplementedError

    def account_fills(self, account_id: str, market: str) -> list[Fill]:
        """The account's fills in `market`, newest first."""
        raise NotImplementedError
