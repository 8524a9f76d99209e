"""What flatten may sell: the ledger's position less the sells still open, from a fresh ledger only."""

from __future__ import annotations

from decimal import Decimal

import orjson

from trading.flatten import sellable_positions

NOW = 1_790_000_000_000


def _open(market: str, side: str, amount: str) -> str:
    return orjson.dumps({"market": market, "side": side, "notional": "50", "amount": amount, "ts": NOW}).decode()


def test_open_sells_are_not_sold_twice() -> None:
    # A first flatten's sale of 1 BTC is sent but not booked: a second flatten must not sell it again.
    ledger = {"updated_ts": str(NOW - 1_000), "BTC-EUR:position": "1", "ETH-EUR:position": "2"}
    held, problem = sellable_positions(ledger, {"a": _open("BTC-EUR", "sell", "1"), "b": _open("ETH-EUR", "sell",
                                                                                                "0.5"),
                                                "c": _open("ETH-EUR", "buy", "3")}, NOW)
    assert problem is None
    assert held == {"BTC-EUR": Decimal(0), "ETH-EUR": Decimal("1.5")}


def test_a_stale_or_unreadable_ledger_sells_nothing() -> None:
    stale = {"updated_ts": str(NOW - 60_000), "BTC-EUR:position": "1"}
    held, problem = sellable_positions(stale, {}, NOW)
    assert held == {} and problem is not None and "more than 30 s ago" in problem
    bad = {"updated_ts": str(NOW), "BTC-EUR:position": "lots"}
    assert sellable_positions(bad, {}, NOW)[0] == {}
    no_amount = orjson.dumps({"market": "BTC-EUR", "side": "sell", "notional": "50"}).decode()
    held, problem = sellable_positions({"updated_ts": str(NOW), "BTC-EUR:position": "1"}, {"x": no_amount}, NOW)
    assert held == {} and problem is not None and "unreadable" in problem


def test_an_empty_ledger_holds_nothing_and_is_no_problem() -> None:
    assert sellable_positions({}, {}, NOW) == ({}, None)
