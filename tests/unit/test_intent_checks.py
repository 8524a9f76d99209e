"""The executor's own checks (trading/execution/intent_checks.py): every rule, at its boundaries."""

from __future__ import annotations

import dataclasses
import uuid
from decimal import Decimal
from typing import Any

import pytest

from trading.execution.intent_checks import LedgerView, check_intent, ledger_fields, ledger_view
from trading.execution.market_rules_book import MarketRulesBook
from trading.matching import MarketRules
from trading.orders import Intent
from trading.risk import PNL_MAX_AGE_MS, Limits

D = Decimal
NOW = 1_800_000_000_000
RULES = MarketRules(market="BTC-EUR", base="BTC", quote="EUR", tick_size=D("1"), quantity_decimals=8,
                    notional_decimals=2, min_order_base=D("0.0001"), min_order_quote=D("5"),
                    max_order_base=D("100"), max_order_quote=D("1000000"))
LIMITS = Limits(max_notional_per_order=D("250"), max_exposure_per_market=D("1000"), max_exposure_total=D("5000"),
                max_open_intents=20, max_daily_loss=D("250"), stale_book_ms=5000, market_cooldown_ms=0)
FRESH = LedgerView()
STALE = LedgerView(position=D("0.002"), untrusted="last updated 60 s ago")
HOLDS = LedgerView(position=D("0.002"))  # fresh, 0.002 BTC held
BEST = D("75000")


def _intent(**changes: Any) -> Intent:
    """A limit IOC buy of 0.001 BTC at 75000 (75 EUR), as the trading core writes one."""
    fields: dict[str, Any] = {"intent_id": str(uuid.uuid4()), "signal_id": "s", "market": "BTC-EUR", "side": "buy",
                              "order_type": "limit", "time_in_force": "IOC", "dry_run": False, "ts": NOW,
                              "amount": D("0.001"), "price": D("75000")}
    fields.update(changes)
    return Intent(**fields)


def _market(**changes: Any) -> Intent:
    return _intent(order_type="market", price=None, **changes)


def _flatten(**changes: Any) -> Intent:
    return _market(**{"side": "sell", "purpose": "flatten", "scope": "ledger", **changes})


CASES: list[tuple[str, Intent, MarketRules | None, LedgerView, Decimal | None, str | None]] = [
    ("a normal limit buy", _intent(), RULES, FRESH, None, None),
    # market rules
    ("unlisted market", _intent(market="FOO-EUR"), None, FRESH, None, "listed"),
    ("halted market", _intent(), dataclasses.replace(RULES, status="halted"), FRESH, None, "trading"),
    ("order type the market does not take", _market(), dataclasses.replace(RULES, order_types=("limit",)), FRESH,
     BEST, "order_type"),
    ("price 1e400", _intent(price=D("1e400")), RULES, FRESH, None, "price"),
    ("price at 10^15", _intent(price=D("1e15")), RULES, FRESH, None, "price"),
    ("price off the tick grid", _intent(price=D("75000.5")), RULES, FRESH, None, "price"),
    ("amount 1e40", _intent(amount=D("1e40")), RULES, FRESH, None, "amount"),
    ("amount above the maximum", _intent(amount=D("100.00000001"), price=D("1")), RULES, FRESH, None, "amount"),
    ("amount at the maximum", _intent(amount=D("100"), price=D("1")), RULES, FRESH, None, None),
    ("amount with too many decimals", _intent(amount=D("0.001000001")), RULES, FRESH, None, "amount"),
    ("amount below the minimum", _intent(amount=D("0.00009999")), RULES, FRESH, None, "amount"),
    ("amount at the minimum", _intent(amount=D("0.0001")), RULES, FRESH, None, None),
    ("amount_quote with too many decimals", _market(amount=None, amount_quote=D("10.001")), RULES, FRESH, None,
     "amount_quote"),
    ("amount_quote below the minimum", _market(amount=None, amount_quote=D("4.99")), RULES, FRESH, None,
     "quote_size"),
    ("amount_quote at the minimum", _market(amount=None, amount_quote=D("5")), RULES, FRESH, None, None),
    ("quote size above the market maximum", _intent(amount=D("14"), price=D("75000")), RULES, FRESH, None,
     "quote_size"),
    ("limit quote size below the minimum", _intent(amount=D("0.0001"), price=D("49999")), RULES, FRESH, None,
     "quote_size"),
    ("market sell by amount below the minimum at the best bid", _market(side="sell", amount=D("0.0001")),
     RULES, HOLDS, D("49999"), "quote_size"),
    # spot inventory
    ("a sell with nothing held", _intent(side="sell"), RULES, FRESH, None, "inventory"),
    ("a sell of the whole position", _intent(side="sell", amount=D("0.002")), RULES, HOLDS, None, None),
    ("a sell beyond the position", _intent(side="sell", amount=D("0.0021")), RULES, HOLDS, None, "inventory"),
    ("an open sell holds part of the position", _intent(side="sell", amount=D("0.0011")), RULES,
     dataclasses.replace(HOLDS, open_sells=D("0.001")), None, "inventory"),
    ("what the open sells leave", _intent(side="sell", amount=D("0.001")), RULES,
     dataclasses.replace(HOLDS, open_sells=D("0.001")), None, None),
    ("a sell by quote amount", _market(side="sell", amount=None, amount_quote=D("10")), RULES, HOLDS, None,
     "inventory"),
    ("stale ledger: a sell within the position", _intent(side="sell", amount=D("0.002")), RULES, STALE, None,
     "inventory"),
    # hard limits
    ("notional above the executor's maximum", _intent(amount=D("0.00333334")), RULES, FRESH, None, "max_notional"),
    ("notional at the executor's maximum", _intent(amount=D("0.004"), price=D("62500")), RULES, FRESH, None, None),
    ("market buy by amount valued at the best ask", _market(amount=D("0.004")), RULES, FRESH, BEST,
     "max_notional"),
    ("market buy by amount facing an empty book", _market(), RULES, FRESH, None, "valued"),
    ("market exposure at the limit", _intent(), RULES, LedgerView(market_exposure=D("925")), None, None),
    ("market exposure above the limit", _intent(), RULES, LedgerView(market_exposure=D("925.01")), None,
     "max_exposure_market"),
    ("total exposure above the limit", _intent(), RULES, LedgerView(total_exposure=D("4925.01")), None,
     "max_exposure_total"),
    ("stale ledger: no new risk", _intent(), RULES, STALE, None, "ledger"),
    ("a sell within the position adds no exposure", _intent(side="sell", amount=D("0.002")), RULES,
     LedgerView(position=D("0.002"), market_exposure=D("5000")), None, None),
    # flatten sales: the market rules and the inventory always, never the hard limits
    ("flatten above the notional limit", _flatten(amount=D("0.01")), RULES,
     LedgerView(position=D("0.01")), BEST, None),
    ("flatten on a stale ledger", _flatten(amount=D("0.001")), RULES, STALE, BEST, "inventory"),
    ("flatten of coins an open sell holds", _flatten(amount=D("0.002")), RULES,
     dataclasses.replace(HOLDS, open_sells=D("0.001")), BEST, "inventory"),
    ("flatten of scope account: the exchange's balance is its cap", _flatten(scope="account", amount=D("5")),
     RULES, FRESH, BEST, None),
    ("flatten of an unlisted market", _flatten(market="FOO-EUR"), None, FRESH, BEST, "listed"),
    ("flatten with too many decimals", _flatten(amount=D("0.001000001")), RULES, HOLDS, BEST, "amount"),
    ("flatten facing an empty book", _flatten(), RULES, HOLDS, None, None),
]


@pytest.mark.parametrize(("intent", "rules", "ledger", "best", "rule"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_each_rule(intent: Intent, rules: MarketRules | None, ledger: LedgerView, best: Decimal | None,
                   rule: str | None) -> None:
    violation = check_intent(intent, rules, LIMITS, ledger, best)
    assert (violation.rule if violation else None) == rule, violation


@pytest.mark.parametrize(("intent", "code"), [
    (_intent(market="FOO-EUR"), "[205]"), (_intent(amount=D("1e40")), "[210]"), (_intent(price=D("1e400")), "[211]"),
    (_intent(price=D("75000.5")), "[422]"), (_intent(amount=D("0.001000001")), "[429]"),
    (_intent(amount=D("0.00009999")), "[212]"), (_market(amount=None, amount_quote=D("4.99")), "[217]")])
def test_market_rule_reasons_name_the_exchange_error_they_spare(intent: Intent, code: str) -> None:
    violation = check_intent(intent, RULES if intent.market == "BTC-EUR" else None, LIMITS, FRESH, None)
    assert violation is not None and code in violation.reason


def test_the_ledger_view_reads_the_mode_hash_and_distrusts_a_stale_or_unreadable_one() -> None:
    assert ledger_fields("BTC-EUR") == ["BTC-EUR:position", "BTC-EUR:exposure", "exposure", "updated_ts"]
    assert ledger_view([None, None, None, None], NOW) == LedgerView()  # nothing traded yet
    fresh = ledger_view(["0.5", "37500", "40000", str(NOW - PNL_MAX_AGE_MS)], NOW)
    assert fresh == LedgerView(D("0.5"), D("37500"), D("40000"))
    stale = ledger_view(["0.5", "37500", "40000", str(NOW - PNL_MAX_AGE_MS - 1)], NOW)
    assert stale.position == D("0.5") and "ago" in (stale.untrusted or "")
    assert "not a decimal" in (ledger_view(["x", None, None, None], NOW).untrusted or "")
    assert "not an integer" in (ledger_view([None, None, None, "soon"], NOW).untrusted or "")
    negative = ledger_view(["-1", None, None, None], NOW)
    assert negative.position == 0 and "below zero" in (negative.untrusted or "")


async def test_the_rules_book_reads_again_for_an_unknown_or_closed_market_at_most_once_per_interval() -> None:
    now = [0.0]
    listings: list[list[MarketRules]] = [[dataclasses.replace(RULES, status="halted")]]
    calls: list[int] = []

    def fetch() -> list[MarketRules]:
        calls.append(1)
        if not listings:
            raise ConnectionError("exchange down")
        return listings.pop(0)

    book = MarketRulesBook(fetch, refresh_s=60, clock=lambda: now[0])
    assert not book.loaded
    await book.load()
    assert book.loaded and len(calls) == 1
    assert (await book.lookup("BTC-EUR")) is not None and len(calls) == 1  # halted, but asked a moment ago
    assert await book.lookup("FOO-EUR") is None and len(calls) == 1
    now[0] = 60
    listings.append([RULES])
    assert await book.lookup("BTC-EUR") == RULES and len(calls) == 2  # reopened since: read again
    assert await book.lookup("BTC-EUR") == RULES and len(calls) == 2  # trading: never read again for it
    now[0] = 120
    assert await book.lookup("FOO-EUR") is None and len(calls) == 3  # the refresh failed: the rules stay
    assert book.get("BTC-EUR") == RULES
