"""Order intents and execution reports: the typed form of `orders:shadow` and `orders:executed`.

An `Intent` is what the trading core decided (one per signal, its UUID `intent_id` is the
exchange clientOrderId), or, with `purpose` "flatten", a sale the flatten operator action asks
for (a sell that cannot rest, by base amount, capped as its `scope` says: docs/executor.md).
Intents written without `purpose` are trades. An `ExecutionReport` is the state of that order after something
happened to it (accepted, filled in part, filled, cancelled, rejected), carrying the fills
that are NEW since the previous report of the same intent, each with its own `fill_id`, so a
reader summing fills never counts one twice. A `Venue` turns intents into reports: the paper
venue (dry-run, the shared matching engine against the live book) or the live venue
(Bitvavo). Parsing refuses anything off-contract with `IntentError`, which the consumer turns
into a dead letter with that reason.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, Protocol

from trading.bus import EXECUTION_SCHEMA, INTENT_SCHEMA, EntryDecodeError, decode_entry, encode_entry
from trading.config import MARKET_PATTERN
from trading.decimals import DecimalParseError, format_decimal, parse_decimal
from trading.execution.market_rules_book import MarketRulesBook

Side = Literal["buy", "sell"]
OrderType = Literal["market", "limit"]
TimeInForce = Literal["GTC", "IOC", "FOK"]
Purpose = Literal["trade", "flatten"]
FlattenScope = Literal["ledger", "account"]
PURPOSES: tuple[Purpose, ...] = ("trade", "flatten")
FLATTEN_SCOPES: tuple[FlattenScope, ...] = ("ledger", "account")
FINAL_STATUSES = frozenset({"filled", "canceled", "rejected", "expired"})
# Exchange order statuses plus `rejected` (refused before or by the exchange, nothing traded).
STATUSES = FINAL_STATUSES | {"new", "partiallyFilled", "awaitingTrigger", "cancelledAuction"}

_INTENT_NAMESPACE = uuid.UUID("6f1c1f8e-3f0a-4c55-9a53-1b5f0c6f2a10")


class IntentError(ValueError):
    """An `orders:shadow` entry that does not follow the contract; the message says which field."""


def intent_id_for(signal_id: str) -> str:
    """The intent of a signal has a fixed UUID: re-processing the signal yields the same clientOrderId."""
    return str(uuid.uuid5(_INTENT_NAMESPACE, signal_id))


@dataclass(frozen=True)
class Intent:
    intent_id: str
    signal_id: str
    market: str
    side: Side
    order_type: OrderType
    time_in_force: TimeInForce
    dry_run: bool
    ts: int
    amount: Decimal | None = None  # base amount; market orders may give amount_quote instead
    amount_quote: Decimal | None = None
    price: Decimal | None = None  # limit orders
    notional: Decimal | None = None  # EUR estimate the guards used
    reduce_only: bool = False
    # "flatten": an operator's flatten sale (trading/flatten.py), which the executor lets through the kill
    # switch and the go-live gate within its cap; `scope` says which cap (flatten intents only).
    purpose: Purpose = "trade"
    scope: FlattenScope | None = None

    def to_fields(self) -> dict[str, Any]:
        return {"ts": self.ts, "intent_id": self.intent_id, "signal_id": self.signal_id, "market": self.market,
                "side": self.side, "order_type": self.order_type, "amount": self.amount,
                "amount_quote": self.amount_quote, "price": self.price, "time_in_force": self.time_in_force,
                "dry_run": self.dry_run, "notional": self.notional, "reduce_only": self.reduce_only,
                # Written only on flatten intents: trade intents keep the fields they always had.
                "purpose": None if self.purpose == "trade" else self.purpose, "scope": self.scope}

    def encode(self) -> dict[str, str]:
        return encode_entry(self.to_fields())

    @classmethod
    def decode(cls, raw: Mapping[Any, Any]) -> Intent:
        try:
            f = decode_entry(raw, INTENT_SCHEMA)
        except EntryDecodeError as exc:
            raise IntentError(str(exc)) from None
        for name in ("intent_id", "signal_id", "market", "side", "order_type", "time_in_force", "dry_run"):
            if name not in f:
                raise IntentError(f"intent lacks {name!r}")
        try:
            uuid.UUID(f["intent_id"])
        except ValueError:
            raise IntentError(f"intent_id {f['intent_id']!r} is not a UUID (it is the clientOrderId)") from None
        if not MARKET_PATTERN.match(f["market"]):
            raise IntentError(f"market {f['market']!r} is not a market name such as BTC-EUR")
        if f["side"] not in ("buy", "sell"):
            raise IntentError(f"side must be buy or sell, got {f['side']!r}")
        if f["order_type"] not in ("market", "limit"):
            raise IntentError(f"order_type must be market or limit, got {f['order_type']!r}")
        if f["time_in_force"] not in ("GTC", "IOC", "FOK"):
            raise IntentError(f"time_in_force must be GTC, IOC or FOK, got {f['time_in_force']!r}")
        for name in ("amount", "amount_quote", "price", "notional"):
            if name in f and f[name] <= 0:
                raise IntentError(f"{name} must be positive, got {format_decimal(f[name])}")
        if ("amount" in f) == ("amount_quote" in f):
            raise IntentError("an intent gives exactly one of amount or amount_quote")
        if f["order_type"] == "limit" and ("price" not in f or "amount" not in f):
            raise IntentError("a limit intent needs price and amount")
        if f["order_type"] == "market" and "price" in f:
            raise IntentError("a market intent has no price")
        purpose = f.get("purpose", "trade")  # entries written before flatten intents existed are trades
        if purpose not in PURPOSES:
            raise IntentError(f"purpose must be trade or flatten, got {purpose!r}")
        scope = f.get("scope")
        if purpose == "flatten" and scope not in FLATTEN_SCOPES:
            raise IntentError(f"a flatten intent's scope must be ledger or account, got {scope!r}")
        if purpose == "trade" and scope is not None:
            raise IntentError("only a flatten intent has a scope")
        return cls(intent_id=f["intent_id"], signal_id=f["signal_id"], market=f["market"], side=f["side"],
                   order_type=f["order_type"], time_in_force=f["time_in_force"], dry_run=f["dry_run"], ts=f["ts"],
                   amount=f.get("amount"), amount_quote=f.get("amount_quote"), price=f.get("price"),
                   notional=f.get("notional"), reduce_only=f.get("reduce_only", False), purpose=purpose,
                   scope=scope)

    def flatten_shape_error(self) -> str | None:
        """Why this flatten intent is not a flatten sale (a sell that cannot rest, by base amount), or None."""
        if self.side != "sell":
            return f"a flatten intent sells; this one is a {self.side}"
        if self.order_type == "limit" and self.time_in_force != "IOC":
            return f"a flatten intent is a market order or an IOC limit, not a {self.time_in_force} limit"
        if self.amount is None:
            return "a flatten intent sells a base amount (amount), not a quote amount"
        return None


@dataclass(frozen=True)
class FillRecord:
    fill_id: str
    ts: int
    amount: Decimal
    price: Decimal
    fee: Decimal
    fee_currency: str
    taker: bool

    def to_json(self) -> dict[str, Any]:
        return {"fill_id": self.fill_id, "ts": self.ts, "amount": format_decimal(self.amount),
                "price": format_decimal(self.price), "fee": format_decimal(self.fee),
                "fee_currency": self.fee_currency, "taker": self.taker}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FillRecord:
        try:
            fill = cls(fill_id=str(data["fill_id"]), ts=int(data["ts"]),
                       amount=parse_decimal(data["amount"], "fill amount"),
                       price=parse_decimal(data["price"], "fill price"), fee=parse_decimal(data["fee"], "fill fee"),
                       fee_currency=str(data["fee_currency"]), taker=bool(data["taker"]))
        except (KeyError, TypeError, ValueError, DecimalParseError) as exc:
            raise IntentError(f"malformed fill {dict(data)!r}: {exc}") from None
        if fill.amount <= 0 or fill.price <= 0:
            raise IntentError(f"fill {fill.fill_id}: amount and price must be positive")
        return fill


@dataclass(frozen=True)
class ExecutionReport:
    intent_id: str
    order_id: str  # exchange order id; paper orders get the paper engine's id; "" when never placed
    market: str
    side: Side
    status: str
    filled_amount: Decimal  # cumulative for the order
    filled_amount_quote: Decimal
    fee: Decimal  # cumulative
    fee_currency: str
    dry_run: bool
    ts: int
    fills: tuple[FillRecord, ...] = ()  # new since the previous report of this intent
    reason: str | None = None  # why rejected/cancelled, when it was

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def avg_price(self) -> Decimal | None:
        if self.filled_amount == 0:
            return None
        return self.filled_amount_quote / self.filled_amount

    def encode(self) -> dict[str, str]:
        return encode_entry({"ts": self.ts, "intent_id": self.intent_id, "order_id": self.order_id,
                             "market": self.market, "side": self.side, "status": self.status,
                             "filled_amount": self.filled_amount, "filled_amount_quote": self.filled_amount_quote,
                             "avg_price": self.avg_price, "fee": self.fee, "fee_currency": self.fee_currency,
                             "dry_run": self.dry_run, "fills": [fill.to_json() for fill in self.fills],
                             "reason": self.reason})

    @classmethod
    def decode(cls, raw: Mapping[Any, Any]) -> ExecutionReport:
        try:
            f = decode_entry(raw, EXECUTION_SCHEMA)
        except EntryDecodeError as exc:
            raise IntentError(str(exc)) from None
        for name in ("intent_id", "market", "side", "status", "filled_amount", "filled_amount_quote", "fee",
                     "fee_currency", "dry_run", "fills"):
            if name not in f:
                raise IntentError(f"execution lacks {name!r}")
        if f["status"] not in STATUSES:
            raise IntentError(f"unknown execution status {f['status']!r}")
        if not MARKET_PATTERN.match(f["market"]):
            raise IntentError(f"market {f['market']!r} is not a market name such as BTC-EUR")
        if f["side"] not in ("buy", "sell"):
            raise IntentError(f"side must be buy or sell, got {f['side']!r}")
        if not isinstance(f["fills"], list):
            raise IntentError("fills must be a JSON list")
        for name in ("filled_amount", "filled_amount_quote"):  # fee may be negative: a maker rebate
            if f[name] < 0:
                raise IntentError(f"{name} must not be negative")
        return cls(intent_id=f["intent_id"], order_id=f.get("order_id", ""), market=f["market"], side=f["side"],
                   status=f["status"], filled_amount=f["filled_amount"],
                   filled_amount_quote=f["filled_amount_quote"], fee=f["fee"], fee_currency=f["fee_currency"],
                   dry_run=f["dry_run"], ts=f["ts"], fills=tuple(FillRecord.from_json(x) for x in f["fills"]),
                   reason=f.get("reason"))


class OrderOutcomeUnknownError(RuntimeError):
    """A venue could not learn whether an intent's order exists. The venue keeps the intent in flight and
    reports its order once the exchange answers (live: reconciliation); the intent is never sent again."""


class Venue(Protocol):
    """Where intents become orders: paper (dry-run) or Bitvavo (live)."""

    dry_run: bool
    market_rules: MarketRulesBook  # GET /markets, loaded by start(); the executor checks intents against it

    async def start(self) -> None:
        """Connect, load the market rules; live: reconcile with the exchange before accepting orders."""

    async def best_price(self, market: str, side: Side) -> Decimal | None:
        """The best opposite price an order of `side` meets first (best ask for a buy), or None when unknown."""

    def blocked_reason(self) -> str | None:
        """Why this venue refuses new orders right now (live: unreconciled mismatches), or None."""

    async def submit(self, intent: Intent) -> list[ExecutionReport]:
        """Place the intent's order; the reports of what happened (none when this intent was already reported)."""

    async def poll(self) -> list[ExecutionReport]:
        """What happened to open orders since the last poll (new fills, cancels, expiries)."""

    async def close(self) -> None: ...
