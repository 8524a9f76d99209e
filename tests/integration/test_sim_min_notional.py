"""The simulator with the official SDK, over REST and the WebSocket: a market order by amount worth
less than minOrderInQuoteAsset at the best opposite price is refused with 217, as Bitvavo refuses it.

The simulator's base minimum is 5 EUR at the starting price, so near it 212 is the stricter
check; the test first sells the bids down below that price, where the base minimum is worth
less than 5 EUR and only the quote check can refuse it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from python_bitvavo_api.bitvavo import Bitvavo

from tests.integration.conftest import SimHandle

OPERATOR = 42


def _best(bv: Any, side: str) -> Decimal:
    return Decimal(bv.book("BTC-EUR", {"depth": 1})[side][0][0])


def test_market_order_by_amount_below_the_minimum_notional_gets_217(sim_factory: Callable[..., SimHandle]) -> None:
    # A slow feed, paused at once: the book stays the starting one, moved only by this test's orders.
    sim = sim_factory("--balance", "EUR=100000,BTC=100", markets="BTC-EUR", book_rate=0.1)
    sim.pause_feed()
    bv = Bitvavo({"APIKEY": sim.api_key, "APISECRET": sim.api_secret, "RESTURL": sim.rest_url,
                  "WSURL": sim.ws_url})
    rules = bv.markets({"market": "BTC-EUR"})
    min_base, min_quote = Decimal(rules["minOrderInBaseAsset"]), Decimal(rules["minOrderInQuoteAsset"])
    worth_the_minimum = min_quote / min_base  # below this price min_base is worth less than min_quote

    bids = bv.book("BTC-EUR", {"depth": 1000})["bids"]
    above = sum((Decimal(size) for price, size in bids if Decimal(price) >= worth_the_minimum), Decimal(0))
    assert any(Decimal(price) < worth_the_minimum for price, _ in bids), "the book must reach below that price"
    if above:
        sold = bv.placeOrder("BTC-EUR", "sell", "market", {"amount": str(above), "operatorId": OPERATOR})
        assert sold["status"] == "filled", sold
    best_bid, best_ask = _best(bv, "bids"), _best(bv, "asks")
    assert min_base * best_bid < min_quote <= min_base * best_ask

    refused = bv.placeOrder("BTC-EUR", "sell", "market", {"amount": str(min_base), "operatorId": OPERATOR})
    assert refused == {"errorCode": 217, "error": "Minimum order size in quote currency is 5 EUR."}
    assert bv.ordersOpen({"market": "BTC-EUR"}) == [] and _best(bv, "bids") == best_bid
    ws_refused = _ws_create(bv, sim, "sell", min_base)  # the same handler over the WebSocket
    assert (ws_refused["action"], ws_refused["errorCode"], ws_refused["error"]) == (
        "privateCreateOrder", 217, refused["error"]), ws_refused

    # The same amount bought is valued at the best ask, where it is worth the minimum.
    bought = bv.placeOrder("BTC-EUR", "buy", "market", {"amount": str(min_base), "operatorId": OPERATOR})
    assert bought["status"] == "filled" and Decimal(bought["filledAmount"]) == min_base, bought


def _ws_create(bv: Any, sim: SimHandle, side: str, amount: Decimal) -> Any:
    """Place a market order through the SDK's WebSocket; its reply (or error frame)."""
    replies: list[Any] = []
    done = threading.Event()

    def reply(message: Any) -> None:
        replies.append(message)
        done.set()

    ws = bv.newWebsocket()
    ws.setErrorCallback(reply)
    try:
        ws.placeOrder("BTC-EUR", side, "market", {"amount": str(amount), "operatorId": OPERATOR}, reply)
        assert done.wait(5), "no reply over the WebSocket"
    finally:
        # Not ws.closeSocket() (see docs/simulator.md, SDK note).
        ws.keepAlive = False
        sim.drop_connections("close")
        ws.receiveThread.join(timeout=5)
    return replies[0]
