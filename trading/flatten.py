"""Flatten: cancel every open order at the exchange and, on request, sell the positions at market.

An operator action (the `flatten` deployment), so each step is also an event on
`trading:events` (type `flatten`) with who and why. Positions are what the exchange holds in
the base asset of each market (available balance), not what our ledger believes: flatten must
work exactly when our own state is in doubt. A sell smaller than the market's minimum is
skipped and reported, never forced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import Any

from trading.decimals import format_decimal, parse_decimal
from trading.exchange.errors import BitvavoError
from trading.exchange.market_rules import rules_from_markets
from trading.exchange.rest import BitvavoRest, new_client_order_id
from trading.matching import MarketRules


@dataclass
class FlattenReport:
    cancelled: list[dict[str, str]] = field(default_factory=list)  # market, order_id
    sold: list[dict[str, str]] = field(default_factory=list)  # market, order_id, client_order_id, amount, status
    skipped: list[dict[str, str]] = field(default_factory=list)  # market, reason
    errors: list[dict[str, str]] = field(default_factory=list)  # market, error

    def rows(self) -> list[dict[str, str]]:
        return ([{"action": "cancelled", **row} for row in self.cancelled]
                + [{"action": "sold", **row} for row in self.sold]
                + [{"action": "skipped", **row} for row in self.skipped]
                + [{"action": "error", **row} for row in self.errors])


def sell_amount(available: Decimal, rules: MarketRules) -> Decimal | None:
    """What can be sold of `available`: rounded down to the market's precision, None below its minimum."""
    amount = available.quantize(Decimal(1).scaleb(-rules.quantity_decimals), rounding=ROUND_DOWN)
    if amount <= 0 or amount < rules.min_order_base:
        return None
    return amount


def flatten_exchange(rest: BitvavoRest, markets: list[str], *, close_positions: bool) -> FlattenReport:
    report = FlattenReport()
    for market in markets:
        try:
            for row in rest.cancel_orders(market):
                report.cancelled.append({"market": market, "order_id": str(row.get("orderId", ""))})
        except BitvavoError as exc:
            report.errors.append({"market": market, "error": f"cancel: {exc}"})
    if not close_positions:
        return report
    rules = {rule.market: rule for rule in rules_from_markets(rest.markets())}
    balances = {row["symbol"]: parse_decimal(row.get("available", "0"), "available") for row in rest.balance()}
    for market in markets:
        rule = rules.get(market)
        if rule is None:
            report.skipped.append({"market": market, "reason": "not listed at the exchange"})
            continue
        available = balances.get(rule.base, Decimal(0))
        amount = sell_amount(available, rule)
        if amount is None:
            minimum = format_decimal(rule.min_order_base)
            report.skipped.append({"market": market,
                                   "reason": f"{format_decimal(available)} {rule.base} is below the minimum {minimum}"})
            continue
        client_order_id = new_client_order_id()
        try:
            order = rest.place_order(market, "sell", "market", amount=amount, client_order_id=client_order_id)
        except BitvavoError as exc:  # an uncertain outcome is reported with its clientOrderId for lookup
            report.errors.append({"market": market, "error": f"sell {format_decimal(amount)}: {exc} "
                                                             f"(clientOrderId {client_order_id})"})
            continue
        report.sold.append({"market": market, "order_id": order.order_id, "client_order_id": client_order_id,
                            "amount": format_decimal(amount), "status": order.status})
    return report


def report_detail(report: FlattenReport) -> dict[str, Any]:
    return {"cancelled": len(report.cancelled), "sold": report.sold, "skipped": report.skipped,
            "errors": report.errors}
