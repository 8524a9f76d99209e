"""Typed views of Bitvavo payloads (REST bodies and WebSocket frames).

Parsers are strict: numbers must be finite decimal strings, integers must be integers, required
fields must be present. A bad payload raises `PayloadError` naming the field, so a feed handler
can count and skip it. Unknown extra fields are kept in `extra`, so nothing is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NamedTuple

from trading.decimals import DecimalParseError, parse_decimal

Level = tuple[Decimal, Decimal]


class PayloadError(ValueError):
    """A payload that does not match Bitvavo's schema."""


def _require(payload: Any, key: str, kind: str) -> Any:
    if not isinstance(payload, dict):
        raise PayloadError(f"{kind} must be a JSON object, got {type(payload).__name__}")
    if key not in payload:
        raise PayloadError(f"{kind}: missing field {key!r}")
    return payload[key]


def _int(value: Any, field_name: str) -> int:
    # Integers arrive as JSON integers; ccxt's recordings stringify them, which we accept losslessly.
    if isinstance(value, bool):
        raise PayloadError(f"{field_name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise PayloadError(f"{field_name} must be an integer, got {value!r}")


def _dec(value: Any, field_name: str) -> Decimal:
    try:
        return parse_decimal(value, field_name)
    except DecimalParseError as exc:
        raise PayloadError(str(exc)) from None


def _opt_dec(payload: dict[str, Any], key: str) -> Decimal | None:
    value = payload.get(key)
    return None if value is None else _dec(value, key)


_KNOWN_MARKETS: set[str] = set()


def parse_market(value: Any) -> str:
    if value in _KNOWN_MARKETS:
        return value  # type: ignore[no-any-return]
    if not isinstance(value, str) or value.count("-") != 1 or value != value.upper():
        raise PayloadError(f"market must be BASE-QUOTE in upper case, got {value!r}")
    if len(_KNOWN_MARKETS) < 10_000:
        _KNOWN_MARKETS.add(value)
    return value


_PRICE_CACHE: dict[str, Decimal] = {}
_PRICE_CACHE_MAX = 200_000
cached_price = _PRICE_CACHE.get  # bound lookup for hot loops; returns None for unseen strings


def parse_level_decimal(text: Any, field_name: str, *, allow_zero: bool) -> Decimal:
    """A book price or size: a decimal string of digits (no sign, NaN, Infinity or float)."""
    # A leading digit rules out "-1", "NaN", "Infinity", "+1", " 1" before Decimal() runs.
    if type(text) is not str or not text or not "0" <= text[0] <= "9":
        raise PayloadError(f"{field_name} must be a non-negative decimal string, got {text!r}")
    try:
        value = Decimal(text)
    except ArithmeticError:
        raise PayloadError(f"{field_name} is not a decimal: {text!r}") from None
    if not allow_zero and not value:
        raise PayloadError(f"{field_name} must be positive, got {text!r}")
    return value


def parse_price(text: Any, field_name: str = "price") -> Decimal:
    """Prices repeat endlessly on a book feed: each distinct string is parsed once."""
    cached = _PRICE_CACHE.get(text) if type(text) is str else None
    if cached is not None:
        return cached
    value = parse_level_decimal(text, field_name, allow_zero=False)
    if len(_PRICE_CACHE) >= _PRICE_CACHE_MAX:
        _PRICE_CACHE.clear()
    _PRICE_CACHE[text] = value
    return value


def parse_levels(raw: Any, field_name: str) -> list[Level]:
    """Snapshot levels [[price, size], ...] -> [(Decimal, Decimal)]; every size positive."""
    if type(raw) is not list:
        raise PayloadError(f"{field_name} must be a list of [price, size]")
    levels: list[Level] = []
    for entry in raw:
        if type(entry) is not list or len(entry) != 2:
            raise PayloadError(f"{field_name} entries must be [price, size], got {entry!r}")
        levels.append((parse_price(entry[0], f"{field_name} price"),
                       parse_level_decimal(entry[1], f"{field_name} size", allow_zero=False)))
    return levels


def _extra(payload: dict[str, Any], known: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k not in known}


class BookSnapshot(NamedTuple):
    market: str
    nonce: int
    bids: list[Level]
    asks: list[Level]
    timestamp_ns: int | None = None

    @classmethod
    def from_wire(cls, payload: Any) -> BookSnapshot:
        return cls(
            market=parse_market(_require(payload, "market", "book snapshot")),
            nonce=_int(_require(payload, "nonce", "book snapshot"), "nonce"),
            bids=parse_levels(_require(payload, "bids", "book snapshot"), "bids"),
            asks=parse_levels(_require(payload, "asks", "book snapshot"), "asks"),
            timestamp_ns=_int(payload["timestamp"], "timestamp") if "timestamp" in payload else None,
        )


@dataclass(frozen=True, slots=True)
class Candle:
    """One OHLCV bucket; `open_ts` is the bucket start in ms."""

    open_ts: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal

    @classmethod
    def from_wire(cls, row: Any) -> Candle:
        if not isinstance(row, list) or len(row) != 6:
            raise PayloadError(f"candle must be [ts, open, high, low, close, volume], got {row!r}")
        candle = cls(_int(row[0], "candle timestamp"), _dec(row[1], "open"), _dec(row[2], "high"),
                     _dec(row[3], "low"), _dec(row[4], "close"), _dec(row[5], "volume"))
        if not (candle.low <= min(candle.open, candle.close) and max(candle.open, candle.close) <= candle.high):
            raise PayloadError(f"candle OHLC inconsistent: {row!r}")
        if candle.volume < 0:
            raise PayloadError(f"candle volume negative: {row!r}")
        return candle


@dataclass(frozen=True, slots=True)
class CandleEvent:
    market: str
    interval: str
    candles: list[Candle]

    @classmethod
    def from_wire(cls, payload: Any) -> CandleEvent:
        rows = _require(payload, "candle", "candle event")
        if not isinstance(rows, list):
            raise PayloadError("candle event: 'candle' must be a list")
        interval = _require(payload, "interval", "candle event")
        if not isinstance(interval, str):
            raise PayloadError("candle event: interval must be a string")
        return cls(parse_market(_require(payload, "market", "candle event")), interval,
                   [Candle.from_wire(r) for r in rows])


_FILL_FIELDS = frozenset({"id", "fillId", "orderId", "clientOrderId", "timestamp", "market", "side", "amount",
                          "price", "taker", "fee", "feeCurrency", "settled", "event"})


@dataclass(frozen=True, slots=True)
class Fill:
    fill_id: str
    timestamp: int
    amount: Decimal
    price: Decimal
    taker: bool
    fee: Decimal | None
    fee_currency: str | None
    settled: bool
    order_id: str | None = None
    client_order_id: str | None = None
    market: str | None = None
    side: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, payload: Any) -> Fill:
        fill_id = payload.get("id", payload.get("fillId")) if isinstance(payload, dict) else None
        if not isinstance(fill_id, str):
            raise PayloadError("fill: missing id/fillId")
        taker = _require(payload, "taker", "fill")
        if not isinstance(taker, bool):
            raise PayloadError(f"fill: taker must be a boolean, got {taker!r}")
        return cls(
            fill_id=fill_id,
            timestamp=_int(_require(payload, "timestamp", "fill"), "timestamp"),
            amount=_dec(_require(payload, "amount", "fill"), "amount"),
            price=_dec(_require(payload, "price", "fill"), "price"),
            taker=taker,
            fee=_opt_dec(payload, "fee"),
            fee_currency=payload.get("feeCurrency"),
            settled=bool(payload.get("settled", payload.get("event") == "fill")),
            order_id=payload.get("orderId"),
            client_order_id=payload.get("clientOrderId"),
            market=payload.get("market"),
            side=payload.get("side"),
            extra=_extra(payload, _FILL_FIELDS),
        )


_ORDER_DECIMALS = ("amount", "amountRemaining", "amountQuote", "amountQuoteRemaining", "price", "onHold",
                   "filledAmount", "filledAmountQuote", "feePaid", "triggerPrice", "triggerAmount")
_ORDER_FIELDS = frozenset({"orderId", "market", "created", "updated", "status", "side", "orderType",
                           "clientOrderId", "operatorId", "fills", "event", *_ORDER_DECIMALS})


@dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    market: str
    created: int
    updated: int
    status: str
    side: str
    order_type: str
    decimals: dict[str, Decimal]
    fills: list[Fill]
    client_order_id: str | None = None
    operator_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def filled_amount(self) -> Decimal:
        return self.decimals.get("filledAmount", Decimal(0))

    @property
    def fee_paid(self) -> Decimal:
        return self.decimals.get("feePaid", Decimal(0))

    @classmethod
    def from_wire(cls, payload: Any) -> Order:
        side = _require(payload, "side", "order")
        if side not in ("buy", "sell"):
            raise PayloadError(f"order: side must be buy or sell, got {side!r}")
        fills_raw = payload.get("fills", [])
        if not isinstance(fills_raw, list):
            raise PayloadError("order: fills must be a list")
        operator = payload.get("operatorId")
        return cls(
            order_id=str(_require(payload, "orderId", "order")),
            market=parse_market(_require(payload, "market", "order")),
            created=_int(_require(payload, "created", "order"), "created"),
            updated=_int(_require(payload, "updated", "order"), "updated"),
            status=str(_require(payload, "status", "order")),
            side=side,
            order_type=str(_require(payload, "orderType", "order")),
            decimals={k: _dec(payload[k], k) for k in _ORDER_DECIMALS if payload.get(k) is not None},
            fills=[Fill.from_wire(f) for f in fills_raw],
            client_order_id=payload.get("clientOrderId"),
            operator_id=None if operator is None else _int(operator, "operatorId"),
            extra=_extra(payload, _ORDER_FIELDS),
        )


_TICKER_DECIMALS = ("open", "high", "low", "last", "volume", "volumeQuote", "bid", "bidSize", "ask", "askSize")
_TICKER_INTS = ("timestamp", "startTimestamp", "openTimestamp", "closeTimestamp")


@dataclass(frozen=True, slots=True)
class Ticker24h:
    """A 24 h rolling ticker row; price/size fields are None for markets without trades."""

    market: str
    values: dict[str, Decimal | None]
    timestamps: dict[str, int]

    @classmethod
    def from_wire(cls, payload: Any) -> Ticker24h:
        market = parse_market(_require(payload, "market", "ticker24h"))
        return cls(
            market=market,
            values={k: _opt_dec(payload, k) for k in _TICKER_DECIMALS},
            timestamps={k: _int(payload[k], k) for k in _TICKER_INTS if payload.get(k) is not None},
        )


@dataclass(frozen=True, slots=True)
class ErrorReply:
    error_code: int
    error: str
    action: str | None = None
    request_id: int | None = None
    market: str | None = None

    @classmethod
    def from_wire(cls, payload: Any) -> ErrorReply:
        code = _require(payload, "errorCode", "error reply")
        return cls(
            error_code=_int(code, "errorCode"),
            error=str(_require(payload, "error", "error reply")),
            action=payload.get("action"),
            request_id=payload.get("requestId"),
            market=payload.get("market"),
        )
