"""The paper venue: a mirror of the live book in the shared engine, and the paper account trading in it.

Books are fed the way `LiveBooks` feeds them (a real `BookSync` per market; updates through
`books.on_book_event`, snapshots through `BookSync.on_snapshot` + the venue's `on_snapshot`
callback), only without the socket that would carry them.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import orjson
import pytest

from trading.decimals import ceil_to
from trading.exchange.market_rules import market_rules_from_wire, rules_from_markets
from trading.exchange.models import BookSnapshot, PayloadError
from trading.execution.paper import (
    NO_LIVE_BOOK,
    NOT_IN_SYNC,
    PAPER_ACCOUNT,
    RESTART_REASON,
    PaperVenue,
    contract_status,
    paper_fill_id,
    restart_cancellations,
)
from trading.matching import FeeRates, MarketRules
from trading.orders import ExecutionReport, FillRecord, Intent, IntentError
from trading.sim.markets import CATALOG, market_wire

D = Decimal
BTC = MarketRules(market="BTC-EUR", base="BTC", quote="EUR", tick_size=D("1"), quantity_decimals=8,
                  notional_decimals=2, min_order_base=D("0.0001"), min_order_quote=D("5"))
ETH = MarketRules(market="ETH-EUR", base="ETH", quote="EUR", tick_size=D("0.01"), quantity_decimals=8,
                  notional_decimals=2, min_order_base=D("0.001"), min_order_quote=D("5"))
FEES = FeeRates(maker=D("0.0015"), taker=D("0.0025"))
NOW = 1_700_000_000_000


async def _venue(**options: Any) -> PaperVenue:
    options.setdefault("book_wait_s", 0.05)
    options.setdefault("fees", FEES)
    venue = PaperVenue(markets=["BTC-EUR"], rules=[BTC, ETH], clock=lambda: NOW, **options)
    await venue.start()
    return venue


def _levels(pairs: list[tuple[str, str]]) -> list[tuple[Decimal, Decimal]]:
    return [(D(p), D(s)) for p, s in pairs]


def _snapshot(venue: PaperVenue, nonce: int, bids: list[tuple[str, str]], asks: list[tuple[str, str]],
              market: str = "BTC-EUR") -> None:
    """What LiveBooks does with a fetched snapshot."""
    sync = venue.books.syncs[market]
    snapshot = BookSnapshot(market, nonce, _levels(bids), _levels(asks))
    assert sync.on_snapshot(snapshot)
    venue.on_snapshot(sync, snapshot)


def _update(venue: PaperVenue, nonce: int, bids: list[list[str]] | None = None, asks: list[list[str]] | None = None,
            market: str = "BTC-EUR") -> None:
    venue.books.on_book_event({"event": "book", "market": market, "nonce": nonce, "bids": bids or [],
                               "asks": asks or []})


def _intent(side: str = "buy", order_type: str = "limit", tif: str = "GTC", *, amount: str | None = None,
            amount_quote: str | None = None, price: str | None = None, market: str = "BTC-EUR",
            intent_id: str | None = None) -> Intent:
    return Intent(intent_id=intent_id or str(uuid.uuid4()), signal_id="sig", market=market, side=side,  # type: ignore[arg-type]
                  order_type=order_type, time_in_force=tif, dry_run=True, ts=NOW,  # type: ignore[arg-type]
                  amount=D(amount) if amount else None, amount_quote=D(amount_quote) if amount_quote else None,
                  price=D(price) if price else None)


async def test_ioc_buy_walks_the_book_fills_partially_and_pays_taker_fees() -> None:
    venue = await _venue()
    _snapshot(venue, 10, bids=[("99", "1")], asks=[("100", "1"), ("101", "2"), ("102", "5")])
    intent = _intent(tif="IOC", amount="4", price="101")

    [report] = await venue.submit(intent)

    assert report.status == "canceled" and report.reason == "canceledIOC"  # the unfilled rest of an IOC
    assert [(f.price, f.amount, f.taker) for f in report.fills] == [(D("100"), D("1"), True), (D("101"), D("2"), True)]
    assert report.filled_amount == D("3") and report.filled_amount_quote == D("302")
    # Taker 0.25 %, a buy pays ceil2 of gross x 1.0025 cumulatively: 302.755 -> 302.76.
    assert report.fee == D("0.76") and sum(f.fee for f in report.fills) == D("0.76")
    assert report.fee_currency == "EUR" and report.dry_run and report.final
    assert report.avg_price == D("302") / D("3")
    assert [f.fill_id for f in report.fills] == [paper_fill_id(report.order_id, 0), paper_fill_id(report.order_id, 1)]
    balances = venue.engine.balances(PAPER_ACCOUNT)
    assert balances["BTC"].available == D("3") and balances["EUR"].available == D("10000") - D("302.76")
    # The liquidity it took stays taken in the mirror until the exchange updates those levels.
    assert venue.engine.best_ask("BTC-EUR") == (D("102"), D("5"))
    assert venue.open_orders == 0 and await venue.poll() == []


async def test_market_order_by_quote_amount_and_one_that_exhausts_the_book() -> None:
    venue = await _venue()
    _snapshot(venue, 1, bids=[("99", "1")], asks=[("100", "1"), ("110", "1")])
    [spent] = await venue.submit(_intent(order_type="market", amount_quote="150"))
    assert spent.status == "filled" and spent.filled_amount_quote <= D("150")
    assert spent.fills[0].price == D("100") and spent.fills[-1].price == D("110")

    [exhausted] = await venue.submit(_intent(order_type="market", amount="5"))
    assert exhausted.status == "canceled" and exhausted.reason == "canceledMarketProtection"
    assert exhausted.filled_amount == D("1") - (spent.filled_amount - D("1"))  # what was left at 110


async def test_gtc_limit_rests_then_fills_as_maker_when_the_book_crosses_it() -> None:
    venue = await _venue()
    _snapshot(venue, 10, bids=[("98", "1")], asks=[("100", "1")])
    intent = _intent(amount="2", price="99")

    [accepted] = await venue.submit(intent)
    assert accepted.status == "new" and accepted.fills == () and not accepted.final
    assert venue.open_orders == 1
    _update(venue, 11, bids=[["98", "3"]])  # elsewhere in the book: nothing for the paper order
    assert await venue.poll() == []

    _update(venue, 12, asks=[["99", "1.5"]])  # the exchange's ask comes down to the paper bid
    [partial] = await venue.poll()
    assert partial.status == "partiallyFilled" and partial.filled_amount == D("1.5")
    [fill] = partial.fills
    assert (fill.price, fill.amount, fill.taker) == (D("99"), D("1.5"), False)
    assert fill.fee == ceil_to(D("148.5") * D("1.0015"), 2) - D("148.5")  # maker 0.15 %
    assert fill.fill_id == paper_fill_id(accepted.order_id, 0)

    _update(venue, 13, asks=[["99", "3"]])
    [filled] = await venue.poll()
    assert filled.status == "filled" and filled.final and filled.filled_amount == D("2")
    assert [f.fill_id for f in filled.fills] == [paper_fill_id(accepted.order_id, 1)]
    assert filled.fee == ceil_to(D("198") * D("1.0015"), 2) - D("198")  # cumulative, like one fill
    assert venue.open_orders == 0 and await venue.poll() == []


async def test_a_frozen_book_refuses_orders_and_fills_nothing_until_resynced() -> None:
    venue = await _venue()
    _snapshot(venue, 10, bids=[("98", "1")], asks=[("100", "1")])
    [resting] = await venue.submit(_intent(amount="1", price="99"))
    assert resting.status == "new"

    _update(venue, 12, asks=[["99", "5"]])  # nonce 11 never came: the book is invalid now
    assert not venue.book_live("BTC-EUR")
    _update(venue, 13, asks=[["98", "5"]])  # crosses the paper bid, but only in a book nobody trusts
    assert await venue.poll() == []
    [refused] = await venue.submit(_intent(tif="IOC", amount="1", price="100"))
    assert refused.status == "rejected" and refused.reason == NOT_IN_SYNC and refused.fills == ()
    assert refused.order_id == "" and refused.filled_amount == 0

    # The resync snapshot reloads the mirror: a level gone meanwhile is gone, the cross fills.
    _snapshot(venue, 20, bids=[("97", "1")], asks=[("99", "0.4"), ("101", "1")])
    [filled] = await venue.poll()
    assert filled.status == "partiallyFilled" and filled.filled_amount == D("0.4")
    assert filled.fills[0].price == D("99") and not filled.fills[0].taker
    assert venue.engine.best_ask("BTC-EUR") == (D("101"), D("1"))
    assert venue.engine.depth("BTC-EUR")[0] == [(D("99"), D("0.6")), (D("97"), D("1"))]


async def test_a_dropped_socket_invalidates_every_book() -> None:
    venue = await _venue()
    _snapshot(venue, 1, bids=[("98", "1")], asks=[("100", "1")])
    venue.books.reset_all()  # what the socket's on_disconnect hook does
    [refused] = await venue.submit(_intent(tif="IOC", amount="1", price="100"))
    assert refused.reason == NOT_IN_SYNC


async def test_a_market_without_a_live_book_is_subscribed_and_waited_for() -> None:
    venue = await _venue()
    [refused] = await venue.submit(_intent(market="ETH-EUR", tif="IOC", amount="1", price="2000"))
    assert refused.status == "rejected" and refused.reason == NO_LIVE_BOOK
    assert "ETH-EUR" in venue.books.syncs  # subscribed on demand
    _snapshot(venue, 5, bids=[("1999", "1")], asks=[("2000", "2")], market="ETH-EUR")
    [filled] = await venue.submit(_intent(market="ETH-EUR", tif="IOC", amount="1", price="2000"))
    assert filled.status == "filled" and filled.filled_amount_quote == D("2000")


async def test_unknown_market_is_bad_input_and_exchange_refusals_are_rejected_reports() -> None:
    venue = await _venue()
    _snapshot(venue, 1, bids=[("98", "1")], asks=[("100", "1")])
    with pytest.raises(IntentError, match="unknown market 'FOO-EUR'"):
        await venue.submit(_intent(market="FOO-EUR", amount="1", price="1"))
    [no_btc] = await venue.submit(_intent(side="sell", tif="IOC", amount="0.5", price="98"))
    assert no_btc.status == "rejected" and no_btc.reason is not None and no_btc.reason.startswith("[216]")
    [too_fine] = await venue.submit(_intent(amount="0.123456789", price="100"))
    assert too_fine.status == "rejected" and too_fine.reason is not None and too_fine.reason.startswith("[429]")
    [off_tick] = await venue.submit(_intent(amount="1", price="99.5"))
    assert off_tick.status == "rejected" and off_tick.reason is not None and off_tick.reason.startswith("[422]")


async def test_the_same_intent_again_returns_its_order_with_every_fill() -> None:
    venue = await _venue()
    _snapshot(venue, 1, bids=[("98", "1")], asks=[("100", "1"), ("101", "1")])
    intent = _intent(amount="3", price="101")
    [first] = await venue.submit(intent)
    [again] = await venue.submit(intent)
    assert again.order_id == first.order_id and again.fills == first.fills
    assert again.status == first.status == "partiallyFilled"
    assert venue.engine.balances(PAPER_ACCOUNT)["BTC"].available == D("2")  # executed once


async def test_an_intent_executed_again_after_a_crash_gets_new_fill_ids() -> None:
    """The first execution died with its process; the second fills at other prices: never under the same ids."""
    intent = _intent(tif="IOC", amount="1", price="101")
    crashed = await _venue()
    _snapshot(crashed, 1, bids=[("98", "1")], asks=[("100", "1")])
    [lost] = await crashed.submit(intent)
    restarted = await _venue()
    _snapshot(restarted, 2, bids=[("98", "1")], asks=[("101", "1")])
    [recorded] = await restarted.submit(intent)
    assert [f.price for f in lost.fills] == [D("100")] and [f.price for f in recorded.fills] == [D("101")]
    assert {f.fill_id for f in lost.fills}.isdisjoint(f.fill_id for f in recorded.fills)


async def test_balances_and_fees_are_parameters_and_validated() -> None:
    venue = await _venue(balances={"EUR": D("50"), "BTC": D("1")}, fees=FeeRates(maker=D("0"), taker=D("0.001")))
    _snapshot(venue, 1, bids=[("98", "1")], asks=[("100", "1")])
    [sold] = await venue.submit(_intent(side="sell", tif="IOC", amount="0.5", price="98"))
    assert sold.status == "filled" and sold.fee == D("49") - (D("49") * D("0.999")).quantize(D("0.01"))
    [poor] = await venue.submit(_intent(tif="IOC", amount="1", price="100"))
    assert poor.status == "rejected" and poor.reason is not None and "[216]" in poor.reason
    with pytest.raises(ValueError, match="balance of EUR"):
        PaperVenue(rules=[BTC], balances={"EUR": D("-1")})
    with pytest.raises(ValueError, match="taker fee"):
        PaperVenue(rules=[BTC], fees=FeeRates(maker=D("0"), taker=D("NaN")))
    with pytest.raises(ValueError, match="market rules or a REST URL"):
        PaperVenue()


def test_engine_statuses_map_onto_the_contract() -> None:
    assert contract_status("new") == ("new", None)
    assert contract_status("partiallyFilled") == ("partiallyFilled", None)
    assert contract_status("filled") == ("filled", None)
    assert contract_status("canceled") == ("canceled", None)
    assert contract_status("canceledFOK") == ("canceled", "canceledFOK")
    assert contract_status("canceledSelfTradePrevention") == ("canceled", "canceledSelfTradePrevention")


def test_market_rules_read_from_get_markets() -> None:
    spec = CATALOG["XRP-EUR"]
    assert market_rules_from_wire(market_wire(spec, spec.rules())) == spec.rules()
    good = market_wire(CATALOG["BTC-EUR"], CATALOG["BTC-EUR"].rules())
    for broken, message in (({k: v for k, v in good.items() if k != "tickSize"}, "lacks 'tickSize'"),
                            ({**good, "tickSize": "NaN"}, "tickSize"),
                            ({**good, "tickSize": "-1"}, "must be positive"),
                            ({**good, "quantityDecimals": "8"}, "quantityDecimals"),
                            ({**good, "minOrderInQuoteAsset": 5.0}, "minOrderInQuoteAsset")):
        with pytest.raises(PayloadError, match=message):
            market_rules_from_wire(broken)
    # A malformed row leaves only its own market out.
    assert [r.market for r in rules_from_markets([good, {**good, "market": "X-EUR", "tickSize": None}])] == ["BTC-EUR"]
    with pytest.raises(PayloadError):
        rules_from_markets("not a list")


def test_orders_left_open_by_a_previous_executor_are_closed_as_canceled() -> None:
    fill = FillRecord(fill_id="f1", ts=NOW, amount=D("0.4"), price=D("99"), fee=D("0.06"), fee_currency="EUR",
                      taker=False)
    last = ExecutionReport(intent_id="i1", order_id="o1", market="BTC-EUR", side="buy", status="partiallyFilled",
                           filled_amount=D("0.4"), filled_amount_quote=D("39.6"), fee=D("0.06"), fee_currency="EUR",
                           dry_run=True, ts=NOW - 5, fills=(fill,))
    reports, unreadable = restart_cancellations({"i1": orjson.dumps(last.encode()).decode(), "i2": "{not json"},
                                                NOW)
    assert unreadable == ["i2"]
    [cancel] = reports
    assert cancel.status == "canceled" and cancel.final and cancel.reason == RESTART_REASON
    assert cancel.fills == () and cancel.ts == NOW
    assert (cancel.intent_id, cancel.order_id, cancel.filled_amount, cancel.fee) == ("i1", "o1", D("0.4"), D("0.06"))
    assert ExecutionReport.decode(cancel.encode()) == cancel
