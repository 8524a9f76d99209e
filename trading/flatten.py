"""Flatten: sell the positions of the mode the stack runs in, through the executor, and record every sale.

An operator action (the `flatten` deployment, flows/ops.py, which switches the kill switch on
first). `flatten_positions`:

1. live: cancels the open orders of the selected markets at the exchange (the executor's live
   venue follows the orders it placed and reports them cancelled, with any fills);
2. with `close_positions`, per market, what to sell:
   - dry-run: the paper ledger's position (`trading:pnl:paper`) less the sells still open
     (`trading:intents:open`: sent, not yet booked, a previous flatten's included), both read in
     one MULTI/EXEC; a ledger older than the PnL loop's heartbeat bound is not trusted (nothing is
     sold). Only the exchange's public endpoints are called (market rules, best bid): nothing
     authenticated, nothing sent;
   - live, scope `ledger`: the live ledger's position (`trading:pnl:live`) less the open sells,
     under the same freshness rule, capped by the available balance of the base asset;
   - live, scope `account`: the whole available balance (an account dedicated to the bot: this
     sells what the bot did not buy too, which the live ledger reports as a ledger anomaly),
   rounded down to the market's precision. A sale below the market's minimum base amount, or
   worth less than its minimum quote amount (minOrderInQuoteAsset) at the best bid, is skipped
   and reported, never forced;
3. writes one flatten intent per sale to `orders:shadow` (a market sell by base amount, in the
   stack's mode, `purpose` flatten with its scope, registered in `trading:intents:open` as the
   trading core registers its intents). The executor lets it through the kill switch and the
   go-live gate within its cap (docs/executor.md), with all of the live venue's send safety, and
   its reports go to `orders:executed` like any other, so the ledger of the mode realises them;
4. waits up to `wait_s` for each sale's final report (or the executor's refusal event) and lists
   each sale with its fills. A sale with neither by then is `unreported`: the executor is not
   running, or is behind.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import Any

import orjson

from trading.bus import (
    EVENT_SCHEMA,
    FLATTEN_AUTH_TTL_S,
    KEY_OPEN_INTENTS,
    ORDERS_EXECUTED,
    ORDERS_SHADOW,
    TRADING_EVENTS,
    as_text,
    decode_entry,
    flatten_authorization_key,
    pnl_key,
)
from trading.clock import now_ms
from trading.config import Settings
from trading.decimals import DecimalParseError, format_decimal, parse_decimal
from trading.exchange.errors import BitvavoError
from trading.exchange.market_rules import rules_from_markets
from trading.exchange.rest import BitvavoRest
from trading.matching import MarketRules
from trading.orders import ExecutionReport, FlattenScope, Intent, IntentError
from trading.risk import PNL_MAX_AGE_MS

SCOPES: tuple[FlattenScope, ...] = ("ledger", "account")
DEFAULT_WAIT_S = 30.0  # for the executor's reports of the sales
_READ_BLOCK_MS = 200


@dataclass(frozen=True)
class PlannedSale:
    market: str
    amount: Decimal
    best_bid: Decimal  # what the sale is valued at (the open-intent record's notional)


@dataclass
class FlattenReport:
    mode: str  # paper or live
    scope: FlattenScope
    cancelled: list[dict[str, str]] = field(default_factory=list)  # market, order_id
    sales: list[dict[str, Any]] = field(default_factory=list)  # one per intent: market, intent_id, amount, outcome
    skipped: list[dict[str, str]] = field(default_factory=list)  # market, reason
    errors: list[dict[str, str]] = field(default_factory=list)  # market, error

    @property
    def unreported(self) -> list[dict[str, Any]]:
        return [sale for sale in self.sales if sale["status"] == "no report"]

    @property
    def complete(self) -> bool:
        """Nothing failed: no error, and every sale filled in full."""
        return not self.errors and all(sale["status"] == "filled" for sale in self.sales)

    def rows(self) -> list[dict[str, str]]:
        """One row per action, for the flow's table artifact."""
        return ([{"action": "cancelled", **row} for row in self.cancelled]
                + [{"action": "sale", **{k: _cell(v) for k, v in sale.items()}} for sale in self.sales]
                + [{"action": "skipped", **row} for row in self.skipped]
                + [{"action": "error", **row} for row in self.errors])

    def detail(self) -> dict[str, Any]:
        """The `flatten` event's detail (and the flow's result)."""
        return {"mode": self.mode, "scope": self.scope, "cancelled": self.cancelled, "sales": self.sales,
                "skipped": self.skipped, "errors": self.errors,
                "unreported": [sale["intent_id"] for sale in self.unreported]}


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def sell_amount(held: Decimal, rules: MarketRules, best_bid: Decimal | None) -> tuple[Decimal | None, str]:
    """What can be sold of `held` (rounded down to the market's precision), or None and why not."""
    amount = held.quantize(Decimal(1).scaleb(-rules.quantity_decimals), rounding=ROUND_DOWN)
    if amount <= 0 or amount < rules.min_order_base:
        return None, (f"{format_decimal(held)} {rules.base} is below the minimum amount "
                      f"{format_decimal(rules.min_order_base)}")
    if best_bid is None:
        return None, "no bid in the book: the sale cannot be valued or filled"
    if amount * best_bid < rules.min_order_quote:
        return None, (f"{format_decimal(amount)} {rules.base} is worth {format_decimal(amount * best_bid)} "
                      f"{rules.quote} at the best bid, below the minimum {format_decimal(rules.min_order_quote)}")
    return amount, ""


def flatten_intent(market: str, amount: Decimal, *, dry_run: bool, scope: FlattenScope, ts: int) -> Intent:
    intent_id = str(uuid.uuid4())
    return Intent(intent_id=intent_id, signal_id=f"flatten:{intent_id}", market=market, side="sell",
                  order_type="market", time_in_force="IOC", dry_run=dry_run, ts=ts, amount=amount,
                  purpose="flatten", scope=scope)


async def flatten_positions(client: Any, settings: Settings, *, markets: Sequence[str] | None,
                            close_positions: bool, scope: FlattenScope, wait_s: float) -> FlattenReport:
    """Cancel (live), sell and wait for the reports, as the module doc says; the kill switch is the caller's."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be ledger or account, got {scope!r}")
    if settings.dry_run and scope == "account":
        raise ValueError("scope account is for live flatten only: dry-run sells the paper ledger's positions")
    if wait_s <= 0:
        raise ValueError("wait_s must be positive")
    dry_run = settings.dry_run
    report = FlattenReport(mode="paper" if dry_run else "live", scope=scope)
    async with client.pipeline(transaction=True) as pipe:  # one instant: a booking is never seen half done
        pipe.hgetall(pnl_key(dry_run))
        pipe.hgetall(KEY_OPEN_INTENTS)
        ledger_raw, open_raw = await pipe.execute()
    ledger = {as_text(k): as_text(v) for k, v in ledger_raw.items()}
    open_intents = {as_text(k): as_text(v) for k, v in open_raw.items()}
    held, problem = sellable_positions(ledger, open_intents, now_ms())
    if problem is not None and scope == "ledger":
        report.errors.append({"market": "*", "error": f"not selling: {problem}"})
        held = {}
    selected = list(markets) if markets else sorted(set(settings.markets_or_default())
                                                    | {m for m, amount in held.items() if amount > 0})
    if not dry_run and not settings.has_credentials:
        report.errors.append({"market": "*", "error": "live flatten needs BITVAVO_API_KEY and BITVAVO_API_SECRET"})
        return report
    if dry_run:
        rest = BitvavoRest(settings.bitvavo_rest_url)  # public endpoints only
    else:
        rest = BitvavoRest(settings.bitvavo_rest_url, api_key=settings.bitvavo_api_key,
                           api_secret=settings.bitvavo_api_secret, operator_id=settings.bitvavo_operator_id)
    try:
        if not dry_run:
            await asyncio.to_thread(_cancel_open_orders, rest, selected, report)
        if not close_positions:
            return report
        sales = await asyncio.to_thread(_plan_sales, rest, selected, held, report, live=not dry_run, scope=scope)
    finally:
        rest.close()
    if sales:
        await _sell(client, settings, sales, report, scope=scope, wait_s=wait_s)
    return report


def sellable_positions(ledger: Mapping[str, str], open_intents: Mapping[str, str], now: int
                       ) -> tuple[dict[str, Decimal], str | None]:
    """(per market: the ledger's position less the base amount of the sells still open, never below 0;
    why none of it can be trusted, or None). Pure. Trusted only when the ledger is fresh and every
    position and open intent reads: a flatten must not sell on a guess."""
    updated = ledger.get("updated_ts", "")
    if ledger and not (updated.isdigit() and now - int(updated) <= PNL_MAX_AGE_MS):
        return {}, f"the ledger was last written at {updated[:20]!r}, more than {PNL_MAX_AGE_MS // 1000} s ago " \
                   "(is the PnL loop running?)"
    held: dict[str, Decimal] = {}
    try:
        for key, value in ledger.items():
            market, _, name = key.rpartition(":")
            if market and name == "position":
                held[market] = parse_decimal(value, key)
        for intent_id, raw in open_intents.items():
            data = orjson.loads(raw)
            if data.get("side") == "sell" and data.get("market") in held:
                held[data["market"]] -= parse_decimal(data["amount"], f"open intent {intent_id} amount")
    except (DecimalParseError, orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        return {}, f"ledger or open intents unreadable: {type(exc).__name__}: {exc}"
    return {market: max(Decimal(0), amount) for market, amount in held.items()}, None


def _cancel_open_orders(rest: BitvavoRest, markets: Sequence[str], report: FlattenReport) -> None:
    for market in markets:
        try:
            for row in rest.cancel_orders(market):
                report.cancelled.append({"market": market, "order_id": str(row.get("orderId", ""))})
        except BitvavoError as exc:
            report.errors.append({"market": market, "error": f"cancel: {exc}"})


def _plan_sales(rest: BitvavoRest, markets: Sequence[str], held: Mapping[str, Decimal], report: FlattenReport, *,
                live: bool, scope: FlattenScope) -> list[PlannedSale]:
    """One sale per market that has something to sell; the others go to `report.skipped` or `.errors`."""
    try:
        rules = {rule.market: rule for rule in rules_from_markets(rest.markets())}
        available: dict[str, Decimal] = {}
        if live:
            for row in rest.balance():
                available[str(row.get("symbol"))] = parse_decimal(row.get("available", "0"), "available")
    except (BitvavoError, DecimalParseError) as exc:
        report.errors.append({"market": "*", "error": f"reading {'balances and ' if live else ''}markets: {exc}"})
        return []
    sales: list[PlannedSale] = []
    for market in markets:
        rule = rules.get(market)
        if rule is None:
            report.skipped.append({"market": market, "reason": "not listed at the exchange"})
            continue
        position = held.get(market, Decimal(0))
        balance = available.get(rule.base, Decimal(0))
        if not live:
            amount = position
        elif scope == "account":
            amount = balance
        else:
            amount = min(position, balance)
        if amount <= 0:
            why = "nothing held in the ledger" if scope == "ledger" and position <= 0 else \
                f"no {rule.base} available at the exchange"
            report.skipped.append({"market": market, "reason": why})
            continue
        try:
            bids = rest.book(market, depth=1).bids
        except BitvavoError as exc:
            report.errors.append({"market": market, "error": f"book: {exc}"})
            continue
        best_bid = bids[0][0] if bids else None
        sellable, why = sell_amount(amount, rule, best_bid)
        if sellable is None or best_bid is None:
            report.skipped.append({"market": market, "reason": why})
            continue
        sales.append(PlannedSale(market, sellable, best_bid))
    return sales


async def _sell(client: Any, settings: Settings, sales: Sequence[PlannedSale], report: FlattenReport, *,
                scope: FlattenScope, wait_s: float) -> None:
    # Read positions of both streams first: a report or refusal cannot come before its intent exists.
    [last_report] = await client.xrevrange(ORDERS_EXECUTED, count=1) or [("0-0", {})]
    [last_event] = await client.xrevrange(TRADING_EVENTS, count=1) or [("0-0", {})]
    now = now_ms()
    intents = [flatten_intent(sale.market, sale.amount, dry_run=settings.dry_run, scope=scope, ts=now)
               for sale in sales]
    async with client.pipeline(transaction=True) as tx:
        for intent, sale in zip(intents, sales, strict=True):
            tx.xadd(ORDERS_SHADOW, intent.encode(), maxlen=settings.stream_maxlen, approximate=True)
            # As the trading core registers an intent: the open sell counts against the inventory until booked.
            tx.hset(KEY_OPEN_INTENTS, intent.intent_id, orjson.dumps(
                {"market": sale.market, "side": "sell", "notional": format_decimal(sale.amount * sale.best_bid),
                 "amount": format_decimal(sale.amount), "ts": now}).decode())
            tx.set(flatten_authorization_key(intent.intent_id), "1", ex=FLATTEN_AUTH_TTL_S)
        await tx.execute()
    outcomes = await _wait_for_outcomes(client, {i.intent_id for i in intents}, as_text(last_report[0]),
                                        as_text(last_event[0]), wait_s)
    for intent in intents:
        row: dict[str, Any] = {"market": intent.market, "intent_id": intent.intent_id,
                               "amount": format_decimal(intent.amount or Decimal(0))}
        row.update(outcomes.get(intent.intent_id) or {
            "status": "no report", "reason": f"no final report or refusal within {wait_s:g} s: is the executor "
                                             "running? (one that starts later refuses the intent as too old)"})
        report.sales.append(row)


async def _wait_for_outcomes(client: Any, intent_ids: set[str], reports_after: str, events_after: str,
                             wait_s: float) -> dict[str, dict[str, Any]]:
    """intent_id -> its outcome: the final report (fills of every report), or the executor's refusal."""
    reports: dict[str, list[ExecutionReport]] = {}
    outcomes: dict[str, dict[str, Any]] = {}
    cursors = {ORDERS_EXECUTED: reports_after, TRADING_EVENTS: events_after}
    deadline = asyncio.get_running_loop().time() + wait_s
    while len(outcomes) < len(intent_ids):
        remaining_ms = int((deadline - asyncio.get_running_loop().time()) * 1000)
        if remaining_ms <= 0:
            break
        replies = await client.xread(cursors, block=min(remaining_ms, _READ_BLOCK_MS), count=500)
        for stream, entries in replies or ():
            stream = as_text(stream)
            for entry_id, fields in entries:
                cursors[stream] = as_text(entry_id)
                if stream == ORDERS_EXECUTED:
                    _on_report(fields, intent_ids, reports, outcomes)
                else:
                    _on_event(fields, intent_ids, outcomes)
    return outcomes


def _on_report(fields: Mapping[Any, Any], intent_ids: set[str], reports: dict[str, list[ExecutionReport]],
               outcomes: dict[str, dict[str, Any]]) -> None:
    try:
        report = ExecutionReport.decode(fields)
    except IntentError:
        return  # not ours to judge: the PnL loop dead-letters it
    if report.intent_id not in intent_ids:
        return
    seen = reports.setdefault(report.intent_id, [])
    seen.append(report)
    if report.final:
        outcomes[report.intent_id] = {
            "status": report.status, "order_id": report.order_id, "reason": report.reason or "",
            "filled_amount": format_decimal(report.filled_amount),
            "filled_amount_quote": format_decimal(report.filled_amount_quote),
            "avg_price": format_decimal(report.avg_price) if report.avg_price is not None else "",
            "fee": format_decimal(report.fee), "fee_currency": report.fee_currency,
            "fills": [fill.to_json() for earlier in seen for fill in earlier.fills]}


def _on_event(fields: Mapping[Any, Any], intent_ids: set[str], outcomes: dict[str, dict[str, Any]]) -> None:
    event = decode_entry(fields, EVENT_SCHEMA)
    intent_id = event.get("intent_id")
    if intent_id not in intent_ids or intent_id in outcomes:
        return
    detail = event.get("detail") or {}
    # The executor's refusals (detail.action refused) and an intent the venue judged bad input.
    if detail.get("action") == "refused" or event["type"] == "intent_rejected":
        outcomes[intent_id] = {"status": "refused", "reason": f"{event['type']}: {detail.get('reason', '')}",
                               "fills": []}
