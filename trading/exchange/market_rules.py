"""GET /markets rows as the matching engine's `MarketRules` (the trading core sizes with them,
the paper venue matches with them): one parser, strict, naming what is wrong with a row."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

from trading.decimals import DecimalParseError, parse_decimal
from trading.exchange.models import PayloadError
from trading.matching import MarketRules

log = logging.getLogger(__name__)
_DEFAULTS = MarketRules(market="", base="", quote="", tick_size=Decimal(1), quantity_decimals=0,
                        notional_decimals=0, min_order_base=Decimal(0), min_order_quote=Decimal(0))


def market_rules_from_wire(row: Any) -> MarketRules:
    """One GET /markets row; `PayloadError` names what is wrong. Maximums absent from a row take the
    engine's defaults (they only bound orders far beyond any risk limit)."""
    if not isinstance(row, dict):
        raise PayloadError(f"market row must be a JSON object, got {type(row).__name__}")
    try:
        market = str(row["market"])
        return MarketRules(
            market=market, base=str(row["base"]), quote=str(row["quote"]),
            tick_size=_positive(row["tickSize"], f"{market} tickSize"),
            quantity_decimals=_count(row["quantityDecimals"], f"{market} quantityDecimals"),
            notional_decimals=_count(row["notionalDecimals"], f"{market} notionalDecimals"),
            min_order_base=parse_decimal(row["minOrderInBaseAsset"], f"{market} minOrderInBaseAsset"),
            min_order_quote=parse_decimal(row["minOrderInQuoteAsset"], f"{market} minOrderInQuoteAsset"),
            max_order_base=parse_decimal(row.get("maxOrderInBaseAsset", _DEFAULTS.max_order_base),
                                         f"{market} maxOrderInBaseAsset"),
            max_order_quote=parse_decimal(row.get("maxOrderInQuoteAsset", _DEFAULTS.max_order_quote),
                                          f"{market} maxOrderInQuoteAsset"),
            max_open_orders=_count(row.get("maxOpenOrders", _DEFAULTS.max_open_orders), f"{market} maxOpenOrders"),
            status=str(row["status"]),
            order_types=tuple(str(t) for t in row.get("orderTypes", _DEFAULTS.order_types)))
    except KeyError as exc:
        raise PayloadError(f"market row {row.get('market')!r} lacks {exc.args[0]!r}") from None
    except DecimalParseError as exc:
        raise PayloadError(str(exc)) from None


def rules_from_markets(rows: Any) -> list[MarketRules]:
    """Every usable row of GET /markets; a malformed row is logged and left out (its market is unknown)."""
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list):
        raise PayloadError(f"GET /markets must return a list, got {type(rows).__name__}")
    rules: list[MarketRules] = []
    for row in rows:
        try:
            rules.append(market_rules_from_wire(row))
        except PayloadError as exc:
            log.warning("market left out: %s", exc)
    return rules


def _positive(value: Any, name: str) -> Decimal:
    try:
        result = parse_decimal(value, name)
    except DecimalParseError as exc:
        raise PayloadError(str(exc)) from None
    if result <= 0:
        raise PayloadError(f"{name} must be positive, got {value!r}")
    return result


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PayloadError(f"{name} must be a non-negative integer, got {value!r}")
    return value
