"""The official Python SDK against the simulator over real HTTP and WebSocket (spec §8 quirks apply)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from python_bitvavo_api.bitvavo import Bitvavo

from tests.integration.conftest import SimHandle, run_simulator
from trading.exchange.models import Candle

OPERATOR = 42


def _client(sim: SimHandle, secret: str | None = None) -> Any:
    return Bitvavo({"APIKEY": sim.api_key, "APISECRET": secret or sim.api_secret,
                    "RESTURL": sim.rest_url, "WSURL": sim.ws_url})


@pytest.fixture(scope="module")
def sdk_sim() -> Iterator[SimHandle]:
    # Enough money that any single book level can be taken (IOC test).
    with run_simulator("--balance", "EUR=10000000,BTC=100", markets="BTC-EUR,ETH-EUR,WMTX-EUR") as handle:
        yield handle


@pytest.fixture
def bv(sdk_sim: SimHandle) -> Any:
    return _client(sdk_sim)


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_public_endpoints(bv: Any) -> None:
    server = bv.time()
    assert abs(server["time"] - time.time() * 1000) < 5000 and server["timeNs"] // 1_000_000 == server["time"]

    markets = bv.markets({})
    assert [m["market"] for m in markets] == ["BTC-EUR", "ETH-EUR", "WMTX-EUR"]
    btc = bv.markets({"market": "BTC-EUR"})
    assert isinstance(btc, dict)  # a filtered list endpoint returns one object
    assert btc["tickSize"] == "1.00" and btc["minOrderInQuoteAsset"] == "5.00" and btc["pricePrecision"] is None
    assert bv.markets({"market": "WMTX-EUR"})["status"] == "halted"
    assert {a["symbol"] for a in bv.assets({})} == {"EUR", "BTC", "ETH", "WMTX"}
    assert bv.assets({"symbol": "BTC"})["name"] == "Bitcoin"

    book = bv.book("BTC-EUR", {"depth": 5})
    assert len(book["bids"]) == 5 and len(book["asks"]) == 5 and isinstance(book["nonce"], int)
    assert Decimal(book["bids"][0][0]) < Decimal(book["asks"][0][0])
    assert book["timestamp"] > 10**18  # ns
    assert len(bv.book("ETH-EUR", {})["bids"]) >= 50

    assert _wait_for(lambda: len(bv.publicTrades("BTC-EUR", {"limit": 3})) == 3)
    trades = bv.publicTrades("BTC-EUR", {"limit": 3})
    assert [t["timestamp"] for t in trades] == sorted((t["timestamp"] for t in trades), reverse=True)
    assert set(trades[0]) == {"id", "timestamp", "amount", "price", "side"}

    candles = bv.candles("BTC-EUR", "1m", {"limit": 2})
    assert candles and all(len(c) == 6 and isinstance(c[0], int) and isinstance(c[1], str) for c in candles)

    assert bv.tickerPrice({"market": "BTC-EUR"})["market"] == "BTC-EUR"
    assert len(bv.tickerPrice({})) == 3
    top = bv.tickerBook({"market": "ETH-EUR"})
    assert Decimal(top["bid"]) < Decimal(top["ask"]) and Decimal(top["bidSize"]) > 0
    day = bv.ticker24h({"market": "BTC-EUR"})
    assert Decimal(day["volumeQuote"]) > 1_000_000 and Decimal(day["low"]) <= Decimal(day["high"])
    assert {row["market"] for row in bv.ticker24h({})} == {"BTC-EUR", "ETH-EUR", "WMTX-EUR"}


def test_a_fresh_simulator_has_a_day_of_history_the_sdk_reads(sim_factory: Callable[..., SimHandle]) -> None:
    bv = _client(sim_factory(markets="BTC-EUR", seed=9, book_rate=0.1))  # history, hardly any live trading yet
    started = bv.time()["time"]
    for interval, minutes in (("1m", 1), ("5m", 5), ("15m", 15), ("1h", 60), ("4h", 240), ("1d", 1440)):
        rows = bv.candles("BTC-EUR", interval, {})
        candles = [Candle.from_wire(row) for row in rows]
        assert len(rows) >= 24 * 60 // minutes and rows[-1][0] <= started - 86_400_000 + minutes * 60_000
        assert [c.open_ts for c in candles] == sorted((c.open_ts for c in candles), reverse=True)
    newest = bv.candles("BTC-EUR", "5m", {"limit": 1})[0][0]
    hour = bv.candles("BTC-EUR", "5m", {"limit": 12, "start": newest - 3_600_000, "end": newest})
    assert [row[0] for row in hour] == [newest - i * 300_000 for i in range(1, 13)]
    trades = bv.publicTrades("BTC-EUR", {"limit": 1000})
    assert len(trades) == 1000 and trades[-1]["timestamp"] > started - 3_600_000
    day = bv.ticker24h({"market": "BTC-EUR"})
    one_minute = bv.candles("BTC-EUR", "1m", {})
    assert Decimal(day["high"]) >= max(Decimal(c[2]) for c in one_minute)
    assert Decimal(day["volumeQuote"]) > 30_000_000 and day["open"] is not None


def test_order_lifecycle(bv: Any, sdk_sim: SimHandle) -> None:
    best_bid = Decimal(bv.tickerBook({"market": "BTC-EUR"})["bid"])
    far = str(best_bid - 2000)
    placed = bv.placeOrder("BTC-EUR", "buy", "limit", {"amount": "0.001", "price": far, "operatorId": OPERATOR})
    assert placed["status"] == "new" and placed["operatorId"] == OPERATOR and placed["onHoldCurrency"] == "EUR"
    order_id = placed["orderId"]
    assert bv.getOrder("BTC-EUR", order_id)["price"] == far
    updated = bv.updateOrder("BTC-EUR", order_id, {"price": str(best_bid - 1999), "operatorId": OPERATOR})
    assert updated["price"] == str(best_bid - 1999) and updated["created"] == placed["created"]
    assert order_id in [o["orderId"] for o in bv.ordersOpen({"market": "BTC-EUR"})]
    assert bv.cancelOrder("BTC-EUR", order_id, OPERATOR) == {"orderId": order_id, "operatorId": OPERATOR}
    assert bv.getOrder("BTC-EUR", order_id)["status"] == "canceled"
    assert bv.ordersOpen({"market": "BTC-EUR"}) == []

    market = bv.placeOrder("BTC-EUR", "buy", "market", {"amount": "0.002", "operatorId": OPERATOR})
    assert market["status"] == "filled" and market["fills"] and market["visible"] is False

    sdk_sim.pause_feed()  # a still book, so the IOC's partial fill is known in advance
    try:
        ask_price, ask_size = bv.book("BTC-EUR", {"depth": 1})["asks"][0]
        ioc = bv.placeOrder("BTC-EUR", "buy", "limit", {
            "amount": str(Decimal(ask_size) + Decimal("0.5")), "price": ask_price, "timeInForce": "IOC",
            "operatorId": OPERATOR})
    finally:
        sdk_sim.resume_feed()
    assert ioc["status"] == "canceledIOC"
    assert Decimal(ioc["filledAmount"]) == Decimal(ask_size)
    assert {f["price"] for f in ioc["fills"]} == {ask_price}

    own = bv.trades("BTC-EUR", {})
    assert {f["orderId"] for f in own} >= {market["orderId"], ioc["orderId"]}
    assert all(f["settled"] and f["feeCurrency"] == "EUR" and f["operatorId"] == OPERATOR for f in own)
    balances = {b["symbol"]: b for b in bv.balance({})}
    assert Decimal(balances["BTC"]["available"]) > 100
    assert Decimal(balances["EUR"]["inOrder"]) == 0
    assert bv.fees("BTC-EUR")["taker"] == "0.0025"
    assert bv.account()["fees"]["maker"] == "0.0015"
    assert [o["orderId"] for o in bv.getOrders("BTC-EUR", {"limit": 1})] == [ioc["orderId"]]


def test_websocket_subscriptions(bv: Any, sdk_sim: SimHandle) -> None:
    events: dict[str, list[Any]] = {"ticker24h": [], "candle": [], "book": [], "error": []}
    lock = threading.Lock()

    def collect(kind: str) -> Callable[[Any], None]:
        def callback(message: Any) -> None:
            with lock:
                events[kind].append(message)
        return callback

    ws = bv.newWebsocket()
    ws.setErrorCallback(collect("error"))  # also receives the SDK's own on_close TypeError (quirk 1)
    try:
        ws.subscriptionTicker24h("BTC-EUR", collect("ticker24h"))
        ws.subscriptionCandles("BTC-EUR", "1m", collect("candle"))
        ws.subscriptionBookUpdate("ETH-EUR", collect("book"))
        assert _wait_for(lambda: len(events["book"]) >= 3)
        bv.placeOrder("BTC-EUR", "sell", "market", {"amount": "0.001", "operatorId": OPERATOR})
        assert _wait_for(lambda: bool(events["candle"]) and bool(events["ticker24h"]), timeout=4)
    finally:
        # Not ws.closeSocket(): it closes the socket under websocket-client's reader thread, which
        # then often sleeps out its 10 s epoll timeout. Stop the SDK's reconnect loop, let the server
        # close, and the reader thread (the only one reading) ends at once.
        ws.keepAlive = False
        sdk_sim.drop_connections("close")
        ws.receiveThread.join(timeout=5)
        assert not ws.receiveThread.is_alive()
    row = events["ticker24h"][0]
    assert row["market"] == "BTC-EUR" and Decimal(row["volume"]) > 0
    candle = events["candle"][-1]
    assert candle["interval"] == "1m" and len(candle["candle"][0]) == 6
    nonces = [e["nonce"] for e in events["book"]]
    assert nonces == list(range(nonces[0], nonces[0] + len(nonces)))
    assert all(e["market"] == "ETH-EUR" for e in events["book"])
    assert not [e for e in events["error"] if isinstance(e, dict)]  # no error frames from the server


def test_wrong_secret_gets_309(sdk_sim: SimHandle) -> None:
    assert _client(sdk_sim, secret="not-the-secret").balance({})["errorCode"] == 309


def test_rate_limit_ban_is_parsed_by_the_sdk(sim_factory: Callable[..., SimHandle]) -> None:
    sim = sim_factory("--rate-limit", "30", "--ban-seconds", "1", markets="BTC-EUR")
    bv = _client(sim)
    reply: Any = None
    for _ in range(200):  # 30 per minute: banned within 31 calls, whatever the minute boundary does
        reply = bv.time()
        if "errorCode" in reply:
            break
    assert reply["errorCode"] == 105
    banned_until = int(reply["error"].split(" at ")[1].split(".")[0])
    assert bv.rateLimitRemaining == 0 and bv.rateLimitReset == banned_until
    assert 0 < banned_until - time.time() * 1000 <= 1500
    assert bv.markets({})["errorCode"] == 105  # still banned
    time.sleep(max(0.0, banned_until / 1000 - time.time()) + 0.2)
    assert "time" in bv.time()
