"""Flatten intents on the wire, and what a flatten may sell of a position."""

from __future__ import annotations

from decimal import Decimal

import pytest

from trading.flatten import flatten_intent, sell_amount
from trading.matching import MarketRules
from trading.orders import Intent, IntentError

D = Decimal
BTC = MarketRules(market="BTC-EUR", base="BTC", quote="EUR", tick_size=D("1"), quantity_decimals=8,
                  notional_decimals=2, min_order_base=D("0.0001"), min_order_quote=D("5"))


def test_a_flatten_intent_round_trips_and_an_entry_without_purpose_is_a_trade() -> None:
    intent = flatten_intent("BTC-EUR", D("0.5"), dry_run=False, scope="account", ts=1)
    assert Intent.decode(intent.encode()) == intent and intent.flatten_shape_error() is None
    trade = {k: v for k, v in intent.encode().items() if k not in ("purpose", "scope")}
    decoded = Intent.decode(trade)
    assert (decoded.purpose, decoded.scope) == ("trade", None)
    assert "purpose" not in decoded.encode()  # trade intents keep the fields they always had


@pytest.mark.parametrize(("changes", "error"), [
    ({"purpose": "hedge"}, "purpose must be trade or flatten"),
    ({"scope": "everything"}, "scope must be ledger or account"),
    ({"purpose": "trade"}, "only a flatten intent has a scope"),
])
def test_purpose_and_scope_are_checked(changes: dict[str, str], error: str) -> None:
    fields = {**flatten_intent("BTC-EUR", D("0.5"), dry_run=True, scope="ledger", ts=1).encode(), **changes}
    with pytest.raises(IntentError, match=error):
        Intent.decode(fields)


def test_a_flatten_intent_must_be_a_sale_that_cannot_rest_by_base_amount() -> None:
    sale = flatten_intent("BTC-EUR", D("0.5"), dry_run=True, scope="ledger", ts=1)
    assert "sells" in (Intent(**{**sale.__dict__, "side": "buy"}).flatten_shape_error() or "")
    resting = Intent(**{**sale.__dict__, "order_type": "limit", "time_in_force": "GTC", "price": D("1")})
    assert "GTC limit" in (resting.flatten_shape_error() or "")
    by_quote = Intent(**{**sale.__dict__, "amount": None, "amount_quote": D("10")})
    assert "base amount" in (by_quote.flatten_shape_error() or "")


def test_sell_amount_rounds_down_and_skips_below_either_minimum() -> None:
    assert sell_amount(D("0.123456789"), BTC, D("50000")) == (D("0.12345678"), "")
    amount, why = sell_amount(D("0.00009"), BTC, D("50000"))
    assert amount is None and "below the minimum amount 0.0001" in why
    amount, why = sell_amount(D("0.0001"), BTC, D("49999"))  # 4.9999 EUR at the best bid
    assert amount is None and "below the minimum 5" in why
    assert sell_amount(D("0.0001"), BTC, None)[0] is None
