"""The trading core's guards: pure, in a fixed order, one table (docs/trading-core.md).

`evaluate(proposal, context, limits)` judges one proposed order against every guard in
`GUARDS` order and returns every outcome; the first failing one (`first_failure`) is the
reason the intent is refused. Nothing here does I/O: the loop reads the `Context` from
Redis once per signal (`context_from_redis` turns the raw replies into it) and writes the
verdict. A value that cannot be read (a corrupt `trading:pnl:<mode>` field, an unknown
`trading:state`) fails the guards that need it: when in doubt, no new risk.

Spot only: a sell needs inventory. The inventory of a market is the position of the mode's
ledger (`trading:pnl:paper` in dry-run, `trading:pnl:live` live: paper coins are never
inventory for a live sell) minus the base amount of the sells still open (sent, not yet in the
ledger), so two sells racing for the same coins cannot both have them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from trading.config import ConfigError, Settings
from trading.decimals import DecimalParseError, format_decimal, parse_decimal
from trading.golive import GateStatus, gate_from_state
from trading.orders import Side

ZERO = Decimal(0)
STATE_ACTIVE = "active"
STATE_REDUCE_ONLY = "reduce-only"
STATE_HALTED = "halted"
TRADING_STATES = (STATE_ACTIVE, STATE_REDUCE_ONLY, STATE_HALTED)

Measure = Decimal | int | str | None
DRY_RUN_GATE = GateStatus(False, "not read: dry-run intents do not need the live gate")
_INTEGER_LIMITS = frozenset({"max_open_intents", "stale_book_ms", "market_cooldown_ms"})


@dataclass(frozen=True)
class Limits:
    """Risk limits: `MAX_*` and friends from Settings, each overridable (flow parameters)."""

    max_notional_per_order: Decimal
    max_exposure_per_market: Decimal
    max_exposure_total: Decimal
    max_open_intents: int
    max_daily_loss: Decimal
    stale_book_ms: int
    market_cooldown_ms: int

    @classmethod
    def from_settings(cls, settings: Settings, overrides: Mapping[str, Any] | None = None) -> Limits:
        """The settings' limits with the non-None `overrides` (Decimal, int or decimal text) applied.

        A bad override raises `ConfigError` naming it, before anything trades.
        """
        limits = cls(max_notional_per_order=settings.max_notional_per_order,
                     max_exposure_per_market=settings.max_exposure_per_market,
                     max_exposure_total=settings.max_exposure_total, max_open_intents=settings.max_open_intents,
                     max_daily_loss=settings.max_daily_loss, stale_book_ms=settings.stale_book_ms,
                     market_cooldown_ms=settings.market_cooldown_ms)
        known = [f.name for f in fields(cls)]
        problems: list[str] = []
        changes: dict[str, Any] = {}
        for name, raw in (overrides or {}).items():
            if raw is None:
                continue
            if name not in known:
                problems.append(f"{name}: not a risk limit (known: {', '.join(known)})")
                continue
            try:
                changes[name] = _limit_value(name, raw, integer=name in _INTEGER_LIMITS)
            except ValueError as exc:
                problems.append(f"{name}={raw!r}: {exc}")
        if problems:
            raise ConfigError(problems)
        return replace(limits, **changes)

    def describe(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}


def _limit_value(name: str, raw: Any, *, integer: bool) -> Decimal | int:
    try:  # parse_decimal refuses floats and booleans: money is never a float
        value = parse_decimal(raw.strip() if isinstance(raw, str) else raw, name)
    except DecimalParseError as exc:
        raise ValueError(str(exc)) from None
    allow_zero = name == "market_cooldown_ms"  # 0 switches the cooldown off
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError("allowed: " + ("an integer >= 0" if allow_zero else "a positive number"))
    if integer:
        if value != value.to_integral_value():
            raise ValueError("allowed: a whole number")
        return int(value)
    return value


@dataclass(frozen=True)
class Proposal:
    """The order a signal asks for, as the guards see it."""

    market: str
    side: Side
    amount: Decimal  # base, already rounded to the market's precision
    notional: Decimal  # EUR: amount x the signal's ref_price
    signal_ts: int  # exchange time of the book the signal was computed from
    min_amount: Decimal = ZERO  # the market's minOrderInBaseAsset when known
    min_notional: Decimal = ZERO  # minOrderInQuoteAsset
    drill: bool = False  # a preflight kill-switch drill signal: proves the guards, never trades


@dataclass(frozen=True)
class OpenIntent:
    market: str
    side: str
    notional: Decimal  # EUR
    amount: Decimal  # base


@dataclass(frozen=True)
class Context:
    """Everything the guards read besides the proposal, as of `now_ms`."""

    now_ms: int
    kill: bool = False
    live: bool = False  # DRY_RUN=false: the live gate applies
    gate: GateStatus = DRY_RUN_GATE
    state: str = STATE_ACTIVE
    position: Decimal = ZERO  # base amount held in the proposal's market (the mode's ledger; never below zero)
    market_exposure: Decimal = ZERO  # EUR, from trading:pnl:<mode>
    total_exposure: Decimal = ZERO
    realized_today: Decimal = ZERO  # EUR, of today's UTC day (0 when the ledger's hash is of another day)
    open_intents: Mapping[str, OpenIntent] = field(default_factory=dict)
    gap_open: bool = False
    last_intent_ms: int | None = None  # last intent this core emitted for the market
    unreadable: Mapping[str, str] = field(default_factory=dict)  # input -> why it could not be read

    def open_notional(self, market: str | None = None) -> Decimal:
        """EUR of the intents still open, in `market` or (None) in all markets."""
        return sum((i.notional for i in self.open_intents.values() if market is None or i.market == market), ZERO)

    def open_sells(self, market: str) -> Decimal:
        """Base amount of the sells still open in `market`: inventory already promised."""
        return sum((i.amount for i in self.open_intents.values() if i.market == market and i.side == "sell"), ZERO)

    def inventory(self, market: str) -> Decimal:
        """What a new sell in `market` may sell: the position less the open sells, never below zero."""
        return max(ZERO, self.position - self.open_sells(market))


@dataclass(frozen=True)
class GuardOutcome:
    guard: str
    passed: bool
    measured: Measure
    limit: Measure
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"guard": self.guard, "passed": self.passed, "measured": _shown(self.measured),
                "limit": _shown(self.limit), "reason": self.reason}


def _shown(value: Measure) -> str | int | None:
    return format_decimal(value) if isinstance(value, Decimal) else value


def reduces_position(side: str, amount: Decimal, position: Decimal) -> bool:
    """True when the order sells part or all of the position (spot: a buy never reduces, nothing is short)."""
    return side == "sell" and 0 < amount <= position


# -- the guards, each (proposal, context, limits) -> outcome ------------------------------------

Guard = Callable[[Proposal, Context, Limits], GuardOutcome]


def _unreadable(name: str, ctx: Context, *inputs: str) -> GuardOutcome | None:
    bad = [f"{key}: {ctx.unreadable[key]}" for key in inputs if key in ctx.unreadable]
    if not bad:
        return None
    return GuardOutcome(name, False, None, None, "input unreadable, refusing new risk: " + "; ".join(bad))


def kill_switch(p: Proposal, ctx: Context, limits: Limits) -> GuardOutcome:
    if ctx.kill:
        return GuardOutcome("kill_switch", False, "1", "unset", "kill switch is on (trading:kill=1)")
    return GuardOutcome("kill_switch", True, "unset", "unset", "kill switch off")


def live_gate(p: Proposal, ctx: Context, limits: Limits) -> GuardOutcome:
    if not ctx.live:
        return GuardOutcome("live_gate", True, "dry-run", "open", "dry-run: no live order, gate not needed")
    if ctx.gate.open:
        return GuardOutcome("live_gate", True, "open", "open", ctx.gate.reason)
    return GuardOutcome("live_gate", False, "closed", "open", f"live intent refused: {ctx.gate.reason}")


def trading_state(p: Proposal, ctx: Context, limits: Limits) -> GuardOutcome:
    name = "trading_state"
    if ctx.state == STATE_ACTIVE:
        return GuardOutcome(name, True, ctx.state, STATE_ACTIVE, "trading is active")
    if ctx.state == STATE_HALTED:
        return GuardOutcome(name, False, ctx.state, STATE_ACTIVE, "trading is halted (trading:state)")
    if ctx.state != STATE_REDUCE_ONLY:
        return GuardOutcome(name, False, ctx.state, STATE_ACTIVE,
                            f"unknown trading:state {ctx.state!r} (allowed: {', '.join(TRADING_STATES)})")
    if (bad := _unreadable(name, ctx, "position")) is not None:
        return bad
    position = format_decimal(ctx.position)
    if reduces_position(p.side, p.amount, ctx.position):
        return GuardOutcome(name, True, position, STATE_REDUCE_ONLY,
                            f"reduce-only: {p.side} {format_decimal(p.amount)} reduces position {position}")
    return GuardOutcome(name, False, position, STATE_REDUCE_ONLY,
                        f"reduce-only: {p.side} {format_decimal(p.amount)} does not reduce position {position}")


def stale_data(p: Proposal, ctx: Context, limits: Limits) -> GuardOutcome:
    age = ctx.now_ms - p.signal_ts
    if ctx.gap_open:
        return GuardOutcome("stale_data", False, "gap open", limits.stale_book_ms,
                            f"{p.market} book is being resynced (bitvavo:gaps:open)")
    if age > limits.stale_book_ms:
        return GuardOutcome("stale_data", False, age, limits.stale_book_ms,
                            f"signal's book is {age} ms old (limit {limits.stale_book_ms} ms)")
    return GuardOutcome("stale_data", True, age, limits.stale_book_ms, "book fresh, no open gap")


def no_inventory(p: Proposal, ctx: Context, limits: Limits) -> GuardOutcome:
    """A sell only of what the mode's ledger holds beyond the open sells, and at least a market minimum of it."""
    name = "no_inventory"
    if p.side != "sell":
        return GuardOutcome(name, True, None, None, "a buy needs no inventory")
    if (bad := _unreadable(name, ctx, "position", "open_intents")) is not None:
        return bad
    available = ctx.inventory(p.market)
    held = (f"position {format_decimal(ctx.position)} - open sells {format_decimal(ctx.open_sells(p.market))} "
            f"= {format_decimal(available)} {p.market.partition('-')[0]}")
    if available <= 0:
        return GuardOutcome(name, False, available, p.amount, f"nothing to sell: {held}")
    if p.amount > available:
        return GuardOutcome(name, False, available, p.amount, f"sell {format_decimal(p.amount)} exceeds {held}")
    unit = p.notional / p.amount if p.amount > 0 else ZERO
    if available < p.min_amount or available * unit < p.min_notional:
        return GuardOutcome(name, False, available, p.min_amount,
                            f"{held}: below the market minimum ({format_decimal(p.min_amount)} base, "
                            f"{format_decimal(p.min_notional)} EUR)")
    return GuardOutcome(name, True, available, p.amount, f"sell within {held}")


def max_notional(p: Proposal, ctx: Context, limits: Limits) -> GuardOutcome:
    passed = p.notional <= limits.max_notional_per_order
    return GuardOutcome("max_notional", passed, p.notional, limits.max_notional_per_order,
                        f"order notional {format_decimal(p.notional)} EUR "
                        f"{'within' if passed else 'above'} {format_decimal(limits.max_notional_per_order)} EUR")


def _exposure(name: str, p: Proposal, ctx: Context, held: Decimal, open_notional: Decimal,
              limit: Decimal) -> GuardOutcome:
    # Open intents count in full: PnL sees only fills, so without them a burst of signals
    # would each pass against the same exposure before any of them filled.
    if (bad := _unreadable(name, ctx, "exposure", "open_intents", "position")) is not None:
        return bad
    reducing = reduces_position(p.side, p.amount, ctx.position)
    projected = held + open_notional + (ZERO if reducing else p.notional)
    if reducing:
        return GuardOutcome(name, True, projected, limit, "reduces the position: adds no exposure")
    passed = projected <= limit
    return GuardOutcome(name, passed, projected, limit,
                        f"exposure {format_decimal(held)} + open intents {format_decimal(open_notional)} + "
                        f"order {format_decimal(p.notional)} EUR {'within' if passed else 'above'} "
                        f"{format_decimal(limit)} EUR")


def max_exposure_market(p: Proposal, ctx: Context, limits: Limits) -> GuardOutcome:
    return _exposure("max_exposure_market", p, ctx, ctx.market_exposure, ctx.open_notional(p.market),
                     limits.max_exposure_per_market)


def max_exposure_total(p: Proposal, ctx: Context, limits: Limits) -> GuardOutcome:
    return _exposure("max_exposure_total", p, ctx, ctx.total_exposure, ctx.open_notional(),
                     limits.max_exposure_total)


def max_open_intents(p: Proposal, ctx: Context, limits: Limits) -> GuardOutcome:
    if (bad := _unreadable("max_open_intents", ctx, "open_intents")) is not None:
        return bad
    count = len(ctx.open_intents)
    passed = count < limits.max_open_intents
    return GuardOutcome("max_open_intents", passed, count, limits.max_open_intents,
                        f"{count} intents open, {'room for' if passed else 'no room for'} another "
                        f"(limit {limits.max_open_intents})")


def daily_loss(p: Proposal, ctx: Context, limits: Limits) -> GuardOutcome:
    if (bad := _unreadable("daily_loss", ctx, "realized_today")) is not None:
        return bad
    floor = -limits.max_daily_loss
    if ctx.realized_today >= floor:
        return GuardOutcome("daily_loss", True, ctx.realized_today, floor, "daily realised loss within the limit")
    if (bad := _unreadable("daily_loss", ctx, "position")) is not None:
        return bad
    if reduces_position(p.side, p.amount, ctx.position):
        return GuardOutcome("daily_loss", True, ctx.realized_today, floor,
                            "daily loss limit reached, but this order reduces the position")
    return GuardOutcome("daily_loss", False, ctx.realized_today, floor,
                        f"realised today {format_decimal(ctx.realized_today)} EUR is a loss beyond "
                        f"{format_decimal(limits.max_daily_loss)} EUR: no new risk today")


def cooldown(p: Proposal, ctx: Context, limits: Limits) -> GuardOutcome:
    if (bad := _unreadable("cooldown", ctx, "last_intent")) is not None:
        return bad
    if ctx.last_intent_ms is None:
        return GuardOutcome("cooldown", True, None, limits.market_cooldown_ms, f"no earlier intent for {p.market}")
    elapsed = ctx.now_ms - ctx.last_intent_ms
    passed = elapsed >= limits.market_cooldown_ms
    return GuardOutcome("cooldown", passed, elapsed, limits.market_cooldown_ms,
                        f"{elapsed} ms since the last {p.market} intent (cooldown {limits.market_cooldown_ms} ms)")


def order_minimum(p: Proposal, ctx: Context, limits: Limits) -> GuardOutcome:
    if p.amount <= 0 or p.amount < p.min_amount:
        return GuardOutcome("order_minimum", False, p.amount, p.min_amount,
                            f"amount {format_decimal(p.amount)} is below the market minimum "
                            f"{format_decimal(p.min_amount)} (or rounds to nothing)")
    if p.notional < p.min_notional:
        return GuardOutcome("order_minimum", False, p.notional, p.min_notional,
                            f"notional {format_decimal(p.notional)} EUR is below the market minimum "
                            f"{format_decimal(p.min_notional)} EUR")
    return GuardOutcome("order_minimum", True, p.notional, p.min_notional, "order above the market minimums")


def drill_signal(p: Proposal, ctx: Context, limits: Limits) -> GuardOutcome:
    """A preflight drill signal that reaches this far (the kill switch was off by then) never trades."""
    if p.drill:
        return GuardOutcome("drill_signal", False, None, None, "preflight drill signals never become intents")
    return GuardOutcome("drill_signal", True, None, None, "not a drill signal")


# The order is the contract (docs/trading-core.md): the first failure is the one reported.
GUARDS: tuple[Guard, ...] = (kill_switch, live_gate, trading_state, stale_data, no_inventory, max_notional,
                             max_exposure_market, max_exposure_total, max_open_intents, daily_loss, cooldown,
                             order_minimum, drill_signal)
GUARD_NAMES: tuple[str, ...] = tuple(guard.__name__ for guard in GUARDS)


def evaluate(proposal: Proposal, context: Context, limits: Limits) -> list[GuardOutcome]:
    """Every guard's outcome, in `GUARDS` order."""
    return [guard(proposal, context, limits) for guard in GUARDS]


def first_failure(outcomes: Sequence[GuardOutcome]) -> GuardOutcome | None:
    return next((outcome for outcome in outcomes if not outcome.passed), None)


# -- the context from Redis's replies ------------------------------------------------------------

PNL_FIELDS = ("exposure", "realized_today", "day")


PNL_MAX_AGE_MS = 30_000  # the PnL loop rewrites its hashes every second; older means it is not running


def pnl_fields_for(market: str) -> list[str]:
    """The `trading:pnl:<mode>` fields the guards read for `market` (HMGET order)."""
    return [*PNL_FIELDS, f"{market}:position", f"{market}:exposure", "updated_ts"]


def utc_date(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).date().isoformat()


def context_from_redis(*, now_ms: int, market: str, live: bool, kill: str | None, state: str | None,
                       pnl: Sequence[str | None], open_intents: Mapping[str, str], gap: str | None,
                       last_intent: str | None, golive: Mapping[str, str] | None) -> Context:
    """The guards' context from the raw replies (pnl in `pnl_fields_for(market)` order)."""
    unreadable: dict[str, str] = {}

    def decimal(name: str, raw: str | None) -> Decimal:
        if raw is None:
            return ZERO  # not written yet: nothing traded
        try:
            return parse_decimal(raw, name)
        except DecimalParseError:
            unreadable[name] = f"ledger value {raw[:40]!r} is not a decimal"
            return ZERO

    total_exposure, realized_today, day, position, market_exposure, updated = pnl
    if updated is not None:  # absent: nothing traded yet. Stale: positions may have moved since; refuse new risk
        age_ms = now_ms - int(updated) if updated.isdigit() else None
        if age_ms is None or age_ms > PNL_MAX_AGE_MS:
            why = (f"ledger last updated {age_ms / 1000:.0f} s ago (is the PnL loop running?)"
                   if age_ms is not None else f"ledger updated_ts {updated[:40]!r} is not an integer")
            unreadable.update(dict.fromkeys(("exposure", "realized_today", "position"), why))
    parsed_open: dict[str, OpenIntent] = {}
    for intent_id, raw in open_intents.items():
        try:
            data = orjson.loads(raw)
            parsed_open[intent_id] = OpenIntent(str(data["market"]), str(data["side"]),
                                                parse_decimal(data["notional"], "notional"),
                                                parse_decimal(data["amount"], "amount"))
        except (orjson.JSONDecodeError, KeyError, TypeError, DecimalParseError):
            unreadable["open_intents"] = f"trading:intents:open {intent_id} is {raw[:60]!r}"
    realized = decimal("realized_today", realized_today)
    if day is not None and day != utc_date(now_ms):
        realized = ZERO  # PnL has not rolled over to today yet: today's realised PnL is nothing so far
    last_ms: int | None = None
    if last_intent is not None:
        try:
            last_ms = int(last_intent)
        except ValueError:
            unreadable["last_intent"] = f"last intent time {last_intent[:40]!r} is not an integer"
    held = decimal("position", position)
    if held < 0:
        unreadable["position"] = f"ledger position {format_decimal(held)} is below zero (a spot ledger never is)"
    exposure = decimal("exposure", total_exposure)
    market_exp = decimal("exposure", market_exposure)
    return Context(
        now_ms=now_ms, kill=kill == "1", live=live,
        gate=gate_from_state(kill, dict(golive or {}), now_ms) if live else DRY_RUN_GATE,
        state=STATE_ACTIVE if state is None else state,
        position=held, market_exposure=market_exp, total_exposure=exposure,
        realized_today=realized, open_intents=parsed_open, gap_open=gap is not None, last_intent_ms=last_ms,
        unreadable=unreadable)
