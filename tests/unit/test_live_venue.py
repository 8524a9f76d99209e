"""Pure parts of the live venue: status mapping, fill dedupe, the state it keeps in Redis."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio
from pydantic import SecretStr

from trading.config import Settings
from trading.exchange.errors import BitvavoError, OutcomeUncertainError, exception_class_for
from trading.exchange.governor import RateBudgetExhaustedError
from trading.exchange.models import Order
from trading.execution.live import (
    LiveVenue,
    OrderState,
    TrackedOrder,
    _transient,
    advance,
    contract_status,
    inflight_json,
    parse_inflight,
    rejected_report,
)
from trading.orders import ExecutionReport, Intent, IntentError, intent_id_for

INTENT = Intent(intent_id=intent_id_for("sig-1"), signal_id="sig-1", market="BTC-EUR", side="buy",
                order_type="limit", time_in_force="GTC", dry_run=False, ts=1_700_000_000_000,
                amount=Decimal("0.01"), price=Decimal("30000"), notional=Decimal("300"))


def _fill(fill_id: str, amount: str, price: str, fee: str | None = "0.45", settled: bool = True) -> dict[str, Any]:
    fill: dict[str, Any] = {"id": fill_id, "timestamp": 1_700_000_000_100, "amount": amount, "price": price,
                            "taker": False, "settled": settled}
    if fee is not None:
        fill.update(fee=fee, feeCurrency="EUR")
    return fill


def _order(status: str, fills: list[dict[str, Any]], updated: int = 1_700_000_000_200) -> Order:
    return Order.from_wire({
        "orderId": "ord-1", "market": "BTC-EUR", "created": 1_700_000_000_000, "updated": updated,
        "status": status, "side": "buy", "orderType": "limit", "clientOrderId": INTENT.intent_id,
        "amount": "0.01", "amountRemaining": "0.01", "price": "30000", "onHold": "300.75", "onHoldCurrency": "EUR",
        "filledAmount": "0", "filledAmountQuote": "0", "feePaid": "0", "feeCurrency": "EUR", "fills": fills,
        "operatorId": 7})


@pytest.mark.parametrize(("exchange", "status", "reason"), [
    ("new", "new", None),
    ("partiallyFilled", "partiallyFilled", None),
    ("filled", "filled", None),
    ("canceled", "canceled", None),
    ("canceledIOC", "canceled", "canceledIOC"),
    ("canceledPostOnly", "canceled", "canceledPostOnly"),
    ("canceledAuction", "canceled", "canceledAuction"),
    ("expired", "expired", None),
    ("somethingNew", "new", "unrecognised exchange status 'somethingNew'"),
])
def test_exchange_statuses_map_to_report_statuses(exchange: str, status: str, reason: str | None) -> None:
    assert contract_status(exchange) == (status, reason)


def test_first_report_carries_every_settled_fill_with_cumulative_figures() -> None:
    order = _order("filled", [_fill("f1", "0.004", "30000", "0.18"), _fill("f2", "0.006", "29990", "0.27")])
    report, state = advance(INTENT, order, None)
    assert report is not None
    assert (report.status, report.order_id, report.dry_run) == ("filled", "ord-1", False)
    assert [f.fill_id for f in report.fills] == ["f1", "f2"]
    assert report.filled_amount == Decimal("0.010")
    assert report.filled_amount_quote == Decimal("0.004") * 30000 + Decimal("0.006") * 29990
    assert report.fee == Decimal("0.45")
    assert report.ts == 1_700_000_000_200
    assert state.fill_ids == ("f1", "f2") and state.final
    assert ExecutionReport.decode(report.encode()) == report  # on contract


def test_later_report_has_only_new_fills_and_none_when_nothing_changed() -> None:
    _, state = advance(INTENT, _order("partiallyFilled", [_fill("f1", "0.004", "30000")]), None)
    again, same = advance(INTENT, _order("partiallyFilled", [_fill("f1", "0.004", "30000")]), state)
    assert again is None and same == state
    report, after = advance(INTENT, _order("filled", [_fill("f1", "0.004", "30000"),
                                                      _fill("f2", "0.006", "30000")]), state)
    assert report is not None
    assert [f.fill_id for f in report.fills] == ["f2"]
    assert report.filled_amount == Decimal("0.010") and report.fee == Decimal("0.90")
    assert after.fill_ids == ("f1", "f2")


def test_status_change_without_fills_is_reported() -> None:
    _, state = advance(INTENT, _order("new", []), None)
    report, _ = advance(INTENT, _order("canceled", []), state)
    assert report is not None and report.status == "canceled" and report.fills == ()


def test_unsettled_fill_waits_and_holds_back_the_final_status() -> None:
    report, state = advance(INTENT, _order("filled", [_fill("f1", "0.004", "30000"),
                                                      _fill("f2", "0.006", "30000", fee=None, settled=False)]), None)
    assert report is not None
    assert report.status == "partiallyFilled" and [f.fill_id for f in report.fills] == ["f1"]
    assert not state.final
    final, after = advance(INTENT, _order("filled", [_fill("f1", "0.004", "30000"),
                                                     _fill("f2", "0.006", "30000")]), state)
    assert final is not None and final.final and [f.fill_id for f in final.fills] == ["f2"]
    assert after.final


def test_tracked_order_round_trips_and_refuses_garbage() -> None:
    state = OrderState("partiallyFilled", Decimal("0.004"), Decimal("120"), Decimal("0.18"), "EUR", ("f1",))
    tracked = TrackedOrder(INTENT, 1_700_000_000_050, "ord-1", state, None)
    assert TrackedOrder.from_json(tracked.to_json()) == tracked
    for garbage in (b"not json", b"{}", b'{"intent": {}, "sent_ms": 1, "order_id": "x", "confirmed": null, '
                                         b'"pending": null}'):
        with pytest.raises(ValueError, match="orders:live:open"):
            TrackedOrder.from_json(garbage)


def test_inflight_entry_round_trips_and_refuses_garbage() -> None:
    assert parse_inflight(inflight_json(INTENT, 123)) == (INTENT, 123)
    for garbage in (b"nope", b"[]", b'{"intent_id": "x"}'):
        with pytest.raises(IntentError):
            parse_inflight(garbage)


def test_rejected_report_is_final_and_on_contract() -> None:
    report = rejected_report(INTENT, "exchange refused the order: [216] insufficient balance", 5)
    assert report.final and report.order_id == "" and report.fee_currency == "EUR"
    assert ExecutionReport.decode(report.encode()) == report


def test_live_venue_needs_credentials_and_operator_id_and_does_not_echo_the_key() -> None:
    client = redis.asyncio.Redis()  # never connected: construction does no I/O
    with pytest.raises(ValueError, match="BITVAVO_API_KEY and BITVAVO_API_SECRET"):
        LiveVenue(client, Settings(dry_run=False))
    key, secret = "k" * 64, "very-secret-value"
    with pytest.raises(ValueError, match="BITVAVO_OPERATOR_ID") as raised:
        LiveVenue(client, Settings(dry_run=False, bitvavo_api_key=SecretStr(key),
                                   bitvavo_api_secret=SecretStr(secret)))
    assert key not in str(raised.value) and secret not in str(raised.value)
    venue = LiveVenue(client, Settings(dry_run=False, bitvavo_api_key=SecretStr(key),
                                       bitvavo_api_secret=SecretStr(secret), bitvavo_operator_id=7))
    assert key not in repr(venue) and secret not in repr(venue)
    assert venue.blocked_reason() == "live venue not started: reconciliation with the exchange has not run"


@pytest.mark.parametrize(("error", "transient"), [
    (OutcomeUncertainError(101, "unknown error"), True), (exception_class_for(111)(111, "unavailable"), True),
    (exception_class_for(105)(105, "banned"), True), (RateBudgetExhaustedError(70.0), True),
    # 304: outside the access window (a clock being re-measured), not read at all: ask again
    (exception_class_for(304)(304, "not received within the access window"), True),
    (exception_class_for(309)(309, "invalid signature"), False), (BitvavoError(205, "invalid market"), False)])
def test_lookups_and_reconciliation_ask_again_only_when_the_exchange_may_answer_later(
        error: Exception, transient: bool) -> None:
    assert _transient(error) is transient
