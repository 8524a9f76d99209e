"""Every real recorded payload parses through our models without loss."""

from decimal import Decimal

import pytest

from tests.fixtures import ccxt_responses, market_snapshot, wire_captures
from trading.book import BookSync, UpdateOutcome
from trading.exchange.models import (
    BookSnapshot,
    Candle,
    CandleEvent,
    ErrorReply,
    Fill,
    Order,
    PayloadError,
    Ticker24h,
)


def _levels(raw: list[list[str]]) -> list[tuple[Decimal, Decimal]]:
    return [(Decimal(p), Decimal(s)) for p, s in raw]


def test_wire_book_frames() -> None:
    frames = [c["frame"] for c in wire_captures() if c["transport"] == "ws"]
    snapshots = [f["response"] for f in frames if f.get("action") == "getBook" and "response" in f]
    deltas = [f for f in frames if f.get("event") == "book"]
    assert snapshots and len(deltas) == 2
    for raw in snapshots:
        snap = BookSnapshot.from_wire(raw)
        assert (snap.market, snap.nonce, snap.timestamp_ns) == (raw["market"], raw["nonce"], raw["timestamp"])
        assert snap.bids == _levels(raw["bids"]) and snap.asks == _levels(raw["asks"])
    for raw in deltas:
        # Every level of the recorded delta lands in the book at its decimal price.
        sync = BookSync(raw["market"])
        sync.on_snapshot(BookSnapshot.from_wire({"market": raw["market"], "nonce": raw["nonce"] - 1,
                                                 "bids": [], "asks": []}))
        assert sync.on_update(raw) is UpdateOutcome.APPLIED and sync.book.nonce == raw["nonce"]
        for side, name in (("buy", "bids"), ("sell", "asks")):
            for price, size in _levels(raw[name]):
                assert sync.book.size_at(side, price) == size


def test_snapshot_books_and_candles() -> None:
    deep = market_snapshot()["deep"]
    candle_count = 0
    for market, data in deep.items():
        book = data["orderBook"]
        snap = BookSnapshot.from_wire({"market": market, **book})
        assert snap.bids == _levels(book["bids"]) and snap.nonce == book["nonce"]
        assert snap.bids[0][0] < snap.asks[0][0]
        for rows in data.get("candles", {}).values():
            for row in rows:
                candle = Candle.from_wire(row)
                assert [candle.open_ts, candle.open, candle.high, candle.low, candle.close, candle.volume] == [
                    row[0], *map(Decimal, row[1:])]
                candle_count += 1
    assert candle_count >= 80


def test_ccxt_orders_fills_candles_and_balances() -> None:
    responses = ccxt_responses()
    created = Order.from_wire(responses["createOrder"])
    assert created.decimals["onHold"] == Decimal("9.03") and created.status == "new"
    assert created.created == 1702354762111 and created.client_order_id == "080b43f8-412d-4dc9-ac1f-d902554087ed"
    assert created.extra["selfTradePrevention"] == "decrementAndCancel"
    edited = Order.from_wire(responses["editOrder"])
    assert edited.decimals["onHold"] == Decimal("9.33")
    for raw in responses["fetchOrders"]:
        order = Order.from_wire(raw)
        assert sum((f.amount for f in order.fills), Decimal(0)) == order.filled_amount
        assert sum((f.fee or Decimal(0) for f in order.fills), Decimal(0)) == order.fee_paid
        for key in ("filledAmountQuote", "onHold", "feePaid"):
            assert order.decimals[key] == Decimal(raw[key])
    fills = [Fill.from_wire(raw) for raw in responses["fetchMyTrades"]]
    assert fills[0].fee == Decimal("0.02448938") and fills[0].settled and fills[0].taker
    assert fills[0].order_id == "af596202-5712-4453-81fa-41bdca71e7b4"
    for row in responses["fetchOHLCV"]:
        assert Candle.from_wire(row).open_ts == row[0]


def test_error_frames() -> None:
    errors = [c.get("frame") or c.get("body") for c in wire_captures()]
    replies = [ErrorReply.from_wire(e) for e in errors if isinstance(e, dict) and "errorCode" in e]
    assert {r.error_code for r in replies} >= {102, 205, 300, 415, 431}
    book_error = next(r for r in replies if r.request_id == 90)
    assert (book_error.action, book_error.market) == ("getBook", "NOPE-EUR")


def test_ticker24h_and_candle_event_shapes() -> None:
    row = {"market": "BTC-EUR", "startTimestamp": 1790204739228, "timestamp": 1790291139228, "open": "74286",
           "openTimestamp": 1790204741050, "high": "74689", "low": "72825", "last": "74095",
           "closeTimestamp": 1790291139100, "bid": "74096", "bidSize": "0.22495445", "ask": "74097",
           "askSize": "0.05930954", "volume": "756.24274878", "volumeQuote": "55805010.13"}
    ticker = Ticker24h.from_wire(row)
    assert ticker.values["volumeQuote"] == Decimal("55805010.13") and ticker.timestamps["timestamp"] == 1790291139228
    assert Ticker24h.from_wire({"market": "NEW-EUR", "last": None}).values["last"] is None
    event = CandleEvent.from_wire({"event": "candle", "market": "BTC-EUR", "interval": "1m",
                                   "candle": [[1789776840000, "70380", "70389", "70380", "70389", "0.00077932"]]})
    assert event.candles[0].high == Decimal("70389")


def test_inconsistent_candle_is_rejected() -> None:
    with pytest.raises(PayloadError):
        Candle.from_wire([1, "10", "9", "8", "10", "1"])  # high below open
