"""The simulator's market catalog: starting levels (spec §6), trading rules and asset metadata.

BTC/ETH/XRP/SOL/ONDO/PEAQ start at the real 2026-09-24 23:05 UTC levels; the other markets start at
plausible prices with Bitvavo-like ticks. WMTX-EUR is `halted` and only served when asked for
explicitly (so 423/431 can be tested without disturbing the default set).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Any

from trading.decimals import format_decimal, format_padded
from trading.matching import MarketRules

QUOTE = "EUR"
MIN_ORDER_QUOTE = Decimal("5.00")
MAX_ORDER = Decimal("1000000000")
MAX_OPEN_ORDERS = 100
NOTIONAL_DECIMALS = 2
ORDER_TYPES = ("market", "limit")


@dataclass(frozen=True)
class MarketSpec:
    market: str
    base: str
    name: str  # the base asset's full name (GET /assets)
    best_bid: Decimal  # starting best bid
    tick_size: str  # as GET /markets writes it; its decimals also pad WebSocket book prices
    quantity_decimals: int
    spread_ticks: int  # starting spread
    volume_quote_24h: Decimal  # EUR; the generated history's daily volume (±20 %) and the flow size
    book_span: Decimal = Decimal("0.002")  # relative depth covered by the visible levels
    status: str = "trading"

    @property
    def tick(self) -> Decimal:
        return Decimal(self.tick_size)

    @property
    def price_decimals(self) -> int:
        return max(0, -int(Decimal(self.tick_size).as_tuple().exponent))

    @property
    def min_order_base(self) -> Decimal:
        """The base amount worth the minimum notional at the starting price, rounded up."""
        step = Decimal(1).scaleb(-self.quantity_decimals)
        return (MIN_ORDER_QUOTE / self.best_bid).quantize(step, rounding=ROUND_CEILING)

    def rules(self) -> MarketRules:
        return MarketRules(
            market=self.market, base=self.base, quote=QUOTE, tick_size=self.tick,
            quantity_decimals=self.quantity_decimals, notional_decimals=NOTIONAL_DECIMALS,
            min_order_base=self.min_order_base, min_order_quote=MIN_ORDER_QUOTE,
            max_order_base=MAX_ORDER, max_order_quote=MAX_ORDER, max_open_orders=MAX_OPEN_ORDERS,
            status=self.status, order_types=ORDER_TYPES)


def _spec(market: str, name: str, bid: str, tick: str, qdec: int, spread: int, volume_m: str,
          **extra: Any) -> MarketSpec:
    return MarketSpec(market=market, base=market.split("-")[0], name=name, best_bid=Decimal(bid),
                      tick_size=tick, quantity_decimals=qdec, spread_ticks=spread,
                      volume_quote_24h=Decimal(volume_m) * 1_000_000, **extra)


CATALOG: dict[str, MarketSpec] = {spec.market: spec for spec in (
    _spec("BTC-EUR", "Bitcoin", "74096", "1.00", 8, 1, "55.8"),
    _spec("ETH-EUR", "Ethereum", "2361.90", "0.01", 8, 1, "21.1"),
    _spec("XRP-EUR", "XRP", "1.35133", "0.00001", 6, 1, "73.6"),
    _spec("SOL-EUR", "Solana", "102.569", "0.001", 8, 1, "18.6"),
    _spec("ONDO-EUR", "Ondo", "0.45460", "0.00001", 8, 1, "17.6"),
    _spec("PEAQ-EUR", "peaq", "0.038144", "0.000001", 8, 50, "0.5", book_span=Decimal("0.03")),
    _spec("HYPE-EUR", "Hyperliquid", "38.415", "0.001", 8, 2, "12.4"),
    _spec("ADA-EUR", "Cardano", "0.68120", "0.00001", 6, 1, "9.2"),
    _spec("NEAR-EUR", "NEAR Protocol", "2.5120", "0.0001", 8, 1, "7.1"),
    _spec("LTC-EUR", "Litecoin", "88.41", "0.01", 8, 2, "6.3"),
    _spec("FET-EUR", "Artificial Superintelligence Alliance", "0.5234", "0.0001", 8, 1, "5.4"),
    _spec("LINK-EUR", "Chainlink", "17.842", "0.001", 8, 2, "5.1"),
    _spec("SUI-EUR", "Sui", "3.1542", "0.0001", 8, 1, "4.6"),
    _spec("XLM-EUR", "Stellar", "0.31245", "0.00001", 6, 1, "4.0"),
    _spec("WMTX-EUR", "WorldMobileToken", "0.1834", "0.0001", 8, 5, "0.2", status="halted"),
)}

DEFAULT_MARKETS: tuple[str, ...] = tuple(m for m, spec in CATALOG.items() if spec.status == "trading")


def market_wire(spec: MarketSpec, rules: MarketRules) -> dict[str, Any]:
    """One GET /markets row (spec §4.1); `status` is live (it can be changed at runtime)."""
    return {
        "market": spec.market,
        "status": rules.status,
        "base": spec.base,
        "quote": QUOTE,
        "pricePrecision": None,
        "minOrderInBaseAsset": format_decimal(rules.min_order_base),
        "minOrderInQuoteAsset": format_padded(rules.min_order_quote, NOTIONAL_DECIMALS),
        "maxOrderInBaseAsset": format_decimal(rules.max_order_base),
        "maxOrderInQuoteAsset": format_decimal(rules.max_order_quote),
        "quantityDecimals": rules.quantity_decimals,
        "notionalDecimals": rules.notional_decimals,
        "tickSize": spec.tick_size,
        "maxOpenOrders": rules.max_open_orders,
        "feeCategory": "A",
        "orderTypes": list(rules.order_types),
    }


def asset_rows(specs: list[MarketSpec]) -> list[dict[str, Any]]:
    """GET /assets rows: EUR plus every base asset of the served markets."""
    rows = [_asset("EUR", "Euro", 2, ["SEPA"])]
    for spec in specs:
        rows.append(_asset(spec.base, spec.name, spec.quantity_decimals, ["Mainnet"]))
    return rows


def _asset(symbol: str, name: str, decimals: int, networks: list[str]) -> dict[str, Any]:
    return {
        "symbol": symbol, "name": name, "decimals": decimals, "depositFee": "0",
        "depositConfirmations": 0 if symbol == "EUR" else 10, "depositStatus": "OK",
        "withdrawalFee": "0", "withdrawalMinAmount": "0", "withdrawalStatus": "OK",
        "networks": networks, "message": "",
    }

