"""The executor's own checks of an intent, before any venue sees it: the last line of defence.

Anyone who can write `orders:shadow` bypasses the trading core's guards, so the executor judges
every intent again against what it knows itself. `check_intent` is pure: the executor reads the
market's rules (`MarketRulesBook`), its mode's ledger (`ledger_view`) and, for a market order by
base amount, the best opposite price, and a violation is never sent (docs/executor.md, step 4).

Rules, in this order; the first one broken is the violation (`Violation.rule`):

market rules (GET /markets), for every intent, flatten sales too; the exchange's error code in
brackets:
- `listed`: the exchange lists the market [205];
- `trading`: its status is `trading` (not halted, cancel-only, in auction) [423-426];
- `order_type`: the market takes the order type [205];
- `price`: a limit price below 10^15 [211] on the tick grid [422];
- `amount`: a base amount below 10^15 [210], with at most the market's quantity decimals [429],
  between the minimum [212] and the maximum [210] base size;
- `amount_quote`: a quote amount with at most the notional decimals [429];
- `quote_size`: the order's quote size between the market's minimum [217] and maximum [210].
  The quote size is amount_quote, or amount x the limit price, or for a market order by amount
  amount x the best opposite price. A market order by amount facing an empty book has none: a
  flatten sale skips this rule then (the exchange too; such an order trades nothing), a trade
  intent breaks `valued` below, because its risk cannot be bounded.

spot inventory, for every sell but a flatten of scope `account` (capped by the exchange's balance):
- `inventory`: the sell is by base amount, the ledger can vouch for its coins (fresh and readable)
  and the amount is at most the ledger's position less the other sells still open in the market
  (`trading:intents:open`: sent and not yet booked, flatten sales included). Two sells, or a sell
  and a flatten, never sell the same coins.

hard limits (Settings' `MAX_*`), for trade intents only:
- `valued`: the intent's worst-case notional (its quote size) is known;
- `max_notional`: it is at most `max_notional_per_order`;
- a sell (within the inventory, checked above) reduces the position and adds no exposure: it
  passes the rules below;
- `ledger`: any other intent is new risk, refused when the ledger cannot bound it (its
  `updated_ts` older than `PNL_MAX_AGE_MS`, or a value unreadable), as the trading core refuses it;
- `max_exposure_market`, `max_exposure_total`: the ledger's exposure (of the market; in total)
  plus that notional is at most the limit. Open intents are not counted: the executor is a
  backstop behind the core's guards, and it must not refuse what the core let through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal

import orjson

from trading.decimals import DecimalParseError, decimal_places, format_decimal, parse_decimal
from trading.matching import MAGNITUDE_LIMIT_EXPONENT, MarketRules
from trading.orders import Intent
from trading.risk import PNL_MAX_AGE_MS, Limits, reduces_position

ZERO = Decimal(0)
_MAGNITUDE_LIMIT = Decimal(10) ** MAGNITUDE_LIMIT_EXPONENT
_STATUS_CODES = {"halted": 423, "cancelOnly": 424, "auction": 425, "auctionMatching": 426}


@dataclass(frozen=True)
class Violation:
    rule: str  # the rule's name (module doc)
    reason: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.reason}"


@dataclass(frozen=True)
class LedgerView:
    """The executor's view of its mode's ledger (`trading:pnl:<mode>`) for one market."""

    position: Decimal = ZERO  # base
    market_exposure: Decimal = ZERO  # EUR
    total_exposure: Decimal = ZERO  # EUR
    untrusted: str | None = None  # why the ledger may not bound new risk (stale, unreadable), or None
    open_sells: Decimal = ZERO  # base of the other sells open in the market (trading:intents:open)


def ledger_fields(market: str) -> list[str]:
    """The ledger hash fields `ledger_view` reads, in its order (one HMGET)."""
    return [f"{market}:position", f"{market}:exposure", "exposure", "updated_ts"]


def ledger_view(values: Sequence[str | None], now_ms: int, *, open_intents: Mapping[str, str] | None = None,
                market: str = "", intent_id: str = "") -> LedgerView:
    """The HMGET reply of `ledger_fields(market)`, with the base amount of the sells open in `market` from
    `open_intents` (HGETALL `trading:intents:open`) other than `intent_id`. Absent fields are zero:
    nothing traded yet. An open intent that does not read makes the view untrusted."""
    raw_position, raw_market_exposure, raw_total_exposure, updated = values
    problems: list[str] = []
    open_sells = ZERO
    for other_id, raw in (open_intents or {}).items():
        if other_id == intent_id:
            continue
        try:
            data = orjson.loads(raw)
            if data.get("market") == market and data.get("side") == "sell":
                open_sells += parse_decimal(data["amount"], "amount")
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, DecimalParseError):
            problems.append(f"open intent {other_id} {raw[:60]!r} does not read")

    def decimal(name: str, raw: str | None) -> Decimal:
        if raw is None:
            return ZERO
        try:
            return parse_decimal(raw, name)
        except DecimalParseError:
            problems.append(f"{name} {raw[:40]!r} is not a decimal")
            return ZERO

    position = decimal("position", raw_position)
    if position < 0:
        problems.append(f"position {format_decimal(position)} is below zero (a spot ledger never is)")
        position = ZERO
    view = LedgerView(position=position, market_exposure=decimal("market exposure", raw_market_exposure),
                      total_exposure=decimal("exposure", raw_total_exposure), open_sells=open_sells)
    if updated is not None:
        if not updated.isdigit():
            problems.append(f"updated_ts {updated[:40]!r} is not an integer")
        elif now_ms - int(updated) > PNL_MAX_AGE_MS:
            problems.append(f"last updated {(now_ms - int(updated)) / 1000:.0f} s ago (is the PnL loop running?)")
    if problems:
        return replace(view, untrusted="; ".join(problems))
    return view


def _shown(value: Decimal) -> str:
    """Plain digits, or scientific notation for a value beyond any order size (1e400 is 401 digits)."""
    return format_decimal(value) if value < _MAGNITUDE_LIMIT else f"{value:.6E}"


def quote_size(intent: Intent, best_price: Decimal | None) -> Decimal | None:
    """amount_quote, amount x limit price, or amount x the best opposite price; None when it cannot be valued."""
    if intent.amount_quote is not None:
        return intent.amount_quote
    assert intent.amount is not None  # Intent.decode: exactly one of amount or amount_quote
    price = intent.price if intent.price is not None else best_price
    return None if price is None else intent.amount * price


def check_intent(intent: Intent, rules: MarketRules | None, limits: Limits, ledger: LedgerView,
                 best_price: Decimal | None) -> Violation | None:
    """The first rule the intent breaks (module doc), or None.

    `best_price` is the best opposite price (best ask for a buy, best bid for a sell), needed only
    for a market order by base amount.
    """
    broken = market_rule_violation(intent, rules, best_price) or inventory_violation(intent, ledger)
    if broken is not None or intent.purpose == "flatten":
        return broken
    return hard_limit_violation(intent, limits, ledger, best_price)


def inventory_violation(intent: Intent, ledger: LedgerView) -> Violation | None:
    """Spot: a sell only of coins the ledger holds and no other open sell has promised (module doc)."""
    if intent.side != "sell" or (intent.purpose == "flatten" and intent.scope == "account"):
        return None
    if intent.amount is None:
        return Violation("inventory", "a sell by quote amount cannot be checked against the inventory")
    if ledger.untrusted is not None:
        return Violation("inventory", f"the ledger cannot vouch for the coins: {ledger.untrusted}")
    available = max(ZERO, ledger.position - ledger.open_sells)
    if intent.amount > available:
        return Violation("inventory", f"sells {_shown(intent.amount)}, more than the position "
                                      f"{format_decimal(ledger.position)} less the open sells "
                                      f"{format_decimal(ledger.open_sells)}")
    return None


def market_rule_violation(intent: Intent, rules: MarketRules | None,
                          best_price: Decimal | None) -> Violation | None:
    if rules is None:
        return Violation("listed", f"market {intent.market} is not listed by the exchange [205]")
    if rules.status != "trading":
        code = _STATUS_CODES.get(rules.status)
        return Violation("trading", f"market {intent.market} is {rules.status}, not trading"
                                    + (f" [{code}]" if code else ""))
    if intent.order_type not in rules.order_types:
        return Violation("order_type", f"market {intent.market} does not take {intent.order_type} orders [205]")
    if intent.price is not None:
        if intent.price >= _MAGNITUDE_LIMIT:
            return Violation("price", f"price {_shown(intent.price)} is above the maximum [211]")
        if intent.price % rules.tick_size != 0:
            return Violation("price", f"price {format_decimal(intent.price)} is not a multiple of the tick size "
                                      f"{format_decimal(rules.tick_size)} [422]")
    if intent.amount is not None:
        amount = intent.amount
        if amount >= _MAGNITUDE_LIMIT or amount > rules.max_order_base:
            return Violation("amount", f"amount {_shown(amount)} is above the maximum order size "
                                       f"{format_decimal(rules.max_order_base)} {rules.base} [210]")
        if decimal_places(amount) > rules.quantity_decimals:
            return Violation("amount", f"amount {format_decimal(amount)} has more than {rules.quantity_decimals} "
                                       "decimals [429]")
        if amount < rules.min_order_base:
            return Violation("amount", f"amount {format_decimal(amount)} is below the minimum order size "
                                       f"{format_decimal(rules.min_order_base)} {rules.base} [212]")
    if intent.amount_quote is not None and decimal_places(intent.amount_quote) > rules.notional_decimals:
        return Violation("amount_quote", f"amount_quote {format_decimal(intent.amount_quote)} has more than "
                                         f"{rules.notional_decimals} decimals [429]")
    size = quote_size(intent, best_price)
    if size is not None:
        if size > rules.max_order_quote:
            return Violation("quote_size", f"quote size {format_decimal(size)} {rules.quote} is above the maximum "
                                           f"{format_decimal(rules.max_order_quote)} {rules.quote} [210]")
        if size < rules.min_order_quote:
            return Violation("quote_size", f"quote size {format_decimal(size)} {rules.quote} is below the minimum "
                                           f"{format_decimal(rules.min_order_quote)} {rules.quote} [217]")
    return None


def hard_limit_violation(intent: Intent, limits: Limits, ledger: LedgerView,
                         best_price: Decimal | None) -> Violation | None:
    notional = quote_size(intent, best_price)
    if notional is None:
        return Violation("valued", f"a market {intent.side} by amount facing an empty book has no worst-case "
                                   "notional: its risk cannot be bounded")
    if notional > limits.max_notional_per_order:
        return Violation("max_notional", f"worst-case notional {format_decimal(notional)} EUR is above "
                                         f"{format_decimal(limits.max_notional_per_order)} EUR")
    if intent.amount is not None and reduces_position(intent.side, intent.amount, ledger.position):
        return None  # a sell within the inventory (checked before): adds no exposure
    if ledger.untrusted is not None:
        return Violation("ledger", f"ledger cannot bound new risk: {ledger.untrusted}")
    for rule, held, limit in (("max_exposure_market", ledger.market_exposure, limits.max_exposure_per_market),
                              ("max_exposure_total", ledger.total_exposure, limits.max_exposure_total)):
        if held + notional > limit:
            return Violation(rule, f"exposure {format_decimal(held)} + order {format_decimal(notional)} EUR is "
                                   f"above {format_decimal(limit)} EUR")
    return None
