"""Streams, snapshot/nonce consistency and the fault-injection control API, over real sockets."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import SimHandle
from trading.exchange.signing import signature, websocket_signature

OPERATOR = 9


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _signed(sim: SimHandle, method: str, path: str, body: str = "") -> dict[str, str]:
    ts = str(int(time.time() * 1000))
    return {"Bitvavo-Access-Key": sim.api_key, "Bitvavo-Access-Timestamp": ts,
            "Bitvavo-Access-Signature": signature(sim.api_secret, ts, method, "/v2" + path, body)}


async def _rest(http: aiohttp.ClientSession, sim: SimHandle, method: str, path: str,
                body: dict[str, Any] | None = None, **kwargs: Any) -> tuple[int, Any]:
    text = json.dumps(body) if body is not None else ""
    async with http.request(method, sim.rest_url + path, data=text or None,
                            headers=_signed(sim, method, path, text), **kwargs) as response:
        return response.status, await response.json()


async def _authenticate(ws: aiohttp.ClientWebSocketResponse, sim: SimHandle) -> None:
    ts = int(time.time() * 1000)
    await ws.send_json({"action": "authenticate", "key": sim.api_key, "timestamp": ts,
                        "signature": websocket_signature(sim.api_secret, ts)})
    assert await ws.receive_json(timeout=5) == {"event": "authenticate", "authenticated": True}


async def _until(ws: aiohttp.ClientWebSocketResponse, match: Callable[[dict[str, Any]], bool],
                 timeout: float = 5.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read frames until one matches; returns it and the frames before it."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        frame = await ws.receive_json(timeout=max(0.01, deadline - time.monotonic()))
        if match(frame):
            return frame, seen
        seen.append(frame)


def _is_book(frame: dict[str, Any]) -> bool:
    return frame.get("event") == "book"


async def test_book_stream_is_contiguous_and_snapshots_share_its_nonce(http: aiohttp.ClientSession,
                                                                       sim: SimHandle) -> None:
    async with http.ws_connect(sim.ws_url) as ws:
        await ws.send_json({"action": "subscribe", "channels": [{"name": "book", "markets": ["BTC-EUR"]}]})
        ack, _ = await _until(ws, lambda f: f.get("event") == "subscribed")
        assert ack["subscriptions"] == {"book": ["BTC-EUR"]}
        events = [(await _until(ws, _is_book))[0] for _ in range(10)]
        await ws.send_json({"action": "getBook", "requestId": 1, "market": "BTC-EUR"})
        reply, before = await _until(ws, lambda f: f.get("action") == "getBook")
        events += [f for f in before if _is_book(f)]
        after, _ = await _until(ws, _is_book)
    nonces = [e["nonce"] for e in events]
    assert nonces == list(range(nonces[0], nonces[0] + len(nonces)))
    snapshot = reply["response"]
    assert snapshot["nonce"] == nonces[-1] and after["nonce"] == snapshot["nonce"] + 1
    assert len(snapshot["bids"]) >= 50 and len(snapshot["asks"]) >= 50
    for event in events:
        for price, size in event["bids"] + event["asks"]:
            assert re.fullmatch(r"\d+\.\d{2}", price), price  # padded to the tick's decimals ("1.00")
            assert size == "0" or re.fullmatch(r"\d+\.\d{8}", size), size
        assert event["timestamp"] > 10**18

    sim.pause_feed()
    try:
        async with http.get(sim.rest_url + "/BTC-EUR/book") as response:
            rest_nonce = (await response.json())["nonce"]
        async with http.ws_connect(sim.ws_url) as ws:
            await ws.send_json({"action": "getBook", "market": "BTC-EUR", "depth": 1})
            assert (await ws.receive_json(timeout=5))["response"]["nonce"] == rest_nonce
        assert sim.stats()["markets"]["BTC-EUR"]["nonce"] == rest_nonce
    finally:
        sim.resume_feed()


async def test_skip_nonce_pause_step_and_resume(http: aiohttp.ClientSession, sim: SimHandle) -> None:
    sim.pause_feed()
    try:
        async with http.ws_connect(sim.ws_url) as ws:
            await ws.send_json({"action": "subscribe", "channels": [{"name": "book", "markets": ["ETH-EUR"]}]})
            await _until(ws, lambda f: f.get("event") == "subscribed")
            await ws.send_json({"action": "getBook", "market": "ETH-EUR", "depth": 1})
            start = (await _until(ws, lambda f: f.get("action") == "getBook"))[0]["response"]["nonce"]
            with pytest.raises(asyncio.TimeoutError):  # paused: silence
                await _until(ws, _is_book, timeout=0.3)
            sim.skip_nonce("ETH-EUR")
            sim.step(2)
            first = (await _until(ws, _is_book))[0]
            second = (await _until(ws, _is_book))[0]
        assert (first["nonce"], second["nonce"]) == (start + 2, start + 3)
    finally:
        sim.resume_feed()
    steps = sim.stats()["markets"]["ETH-EUR"]["steps"]
    await asyncio.sleep(0.3)
    assert sim.stats()["markets"]["ETH-EUR"]["steps"] > steps


async def test_drop_connections(http: aiohttp.ClientSession, sim: SimHandle) -> None:
    for mode in ("abort", "close"):
        sockets = [await http.ws_connect(sim.ws_url) for _ in range(2)]
        try:
            for ws in sockets:
                await ws.send_json({"action": "getTime"})
                await ws.receive_json(timeout=5)
            assert sim.stats()["connections"] >= 2
            sim.drop_connections(mode)
            for ws in sockets:
                message = await ws.receive(timeout=5)
                assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
                if mode == "close":
                    assert ws.close_code == 1001 or message.data == 1001
        finally:
            for ws in sockets:
                await ws.close()
    async with http.ws_connect(sim.ws_url.rstrip("/")) as ws:  # a reconnect works; "/v2" without slash too
        await ws.send_json({"action": "getTime"})
        assert "time" in (await ws.receive_json(timeout=5))["response"]


async def test_injected_rest_errors_and_timeouts(http: aiohttp.ClientSession, sim: SimHandle) -> None:
    sim.fail_next(2, error_code=111)
    for _ in range(2):
        async with http.get(sim.rest_url + "/time") as response:
            assert (response.status, (await response.json())["errorCode"]) == (503, 111)
            assert "bitvavo-ratelimit-remaining" in response.headers
    async with http.get(sim.rest_url + "/time") as response:
        assert response.status == 200

    # 101 with execute: the order exists although the caller was told "unknown error"
    coid = str(uuid.uuid4())
    order = {"market": "BTC-EUR", "side": "buy", "orderType": "limit", "amount": "0.01", "price": "1000",
             "clientOrderId": coid, "operatorId": OPERATOR}
    sim.fail_next(1, error_code=101, execute=True)
    assert await _rest(http, sim, "POST", "/order", order) == (500, {"errorCode": 101, "error": (
        "Unknown error. Operation may or may not have succeeded.")})
    status, found = await _rest(http, sim, "GET", f"/order?market=BTC-EUR&clientOrderId={coid}")
    assert status == 200 and found["status"] == "new"

    # a hang longer than the client's timeout, executed: the cancel happened anyway
    sim.hang_next(1, seconds=1.5, execute=True)
    with pytest.raises(asyncio.TimeoutError):
        await _rest(http, sim, "DELETE", f"/order?market=BTC-EUR&clientOrderId={coid}&operatorId={OPERATOR}",
                    timeout=aiohttp.ClientTimeout(total=0.4))
    status, found = await _rest(http, sim, "GET", f"/order?market=BTC-EUR&clientOrderId={coid}")
    assert found["status"] == "canceled"
    # not executed: the connection drops after the hang and nothing happened (POST: no client retry)
    sim.hang_next(1, seconds=0.3)
    lost = {**order, "clientOrderId": str(uuid.uuid4())}
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await _rest(http, sim, "POST", "/order", lost)
    status, missing = await _rest(http, sim, "GET", f"/order?market=BTC-EUR&clientOrderId={lost['clientOrderId']}")
    assert (status, missing["errorCode"]) == (404, 240)
    assert sim.stats()["faults"]["pending_rest_faults"] == []


async def test_rate_limit_budget_ban_and_reset(http: aiohttp.ClientSession, sim: SimHandle) -> None:
    into_minute_ms = int(time.time() * 1000) % 60_000
    if into_minute_ms > 57_000:  # the counter resets at the minute: do not straddle it
        await asyncio.sleep((60_000 - into_minute_ms) / 1000 + 0.05)
    sim.control(rate_limit={"limit": 6, "ip_ban_seconds": 60}, reset_rate_limits=True)
    try:
        statuses = []
        for _ in range(4):
            async with http.get(sim.rest_url + "/time") as response:
                statuses.append((response.status, response.headers["bitvavo-ratelimit-remaining"]))
        assert statuses == [(200, "5"), (200, "4"), (200, "3"), (200, "2")]
        async with http.ws_connect(sim.ws_url) as ws:  # WebSocket actions draw on the same budget
            for _ in range(2):
                await ws.send_json({"action": "getTime"})
                assert "response" in await ws.receive_json(timeout=5)
            await ws.send_json({"action": "getTime", "requestId": 8})
            banned = await ws.receive_json(timeout=5)
        assert (banned["action"], banned["requestId"], banned["errorCode"]) == ("getTime", 8, 105)
        async with http.get(sim.rest_url + "/time") as response:
            body = await response.json()
            assert (response.status, body["errorCode"]) == (429, 105)
            until = int(body["error"].split(" at ")[1].split(".")[0])
            assert 55_000 < until - time.time() * 1000 <= 60_000  # the IP ban length
        # the signed budget is separate from the IP's
        status, _ = await _rest(http, sim, "GET", "/balance")
        assert status == 200
        sim.reset_rate_limits()
        async with http.get(sim.rest_url + "/time") as response:
            assert response.status == 200
    finally:
        sim.control(rate_limit={"limit": 1000, "ip_ban_seconds": 900}, reset_rate_limits=True)


async def test_subscription_acks_and_market_streams(http: aiohttp.ClientSession, sim: SimHandle) -> None:
    async with http.ws_connect(sim.ws_url) as ws:
        await ws.send_json({"action": "subscribe", "channels": [{"name": "ticker", "markets": ["BTC-EUR"]}]})
        ack, _ = await _until(ws, lambda f: f.get("event") == "subscribed")
        assert ack["subscriptions"] == {"ticker": ["BTC-EUR"]}
        await ws.send_json({"action": "subscribe", "channels": [
            {"name": "candles", "interval": ["1m", "1h"], "markets": ["BTC-EUR"]},
            {"name": "trades", "markets": ["BTC-EUR", "WMTX-EUR"]},
            {"name": "ticker", "markets": ["BTC-EUR"]}]})
        ack, _ = await _until(ws, lambda f: f.get("event") == "subscribed")
        assert ack["subscriptions"] == {"ticker": ["BTC-EUR"], "candles": {"1m": ["BTC-EUR"], "1h": ["BTC-EUR"]},
                                        "trades": ["BTC-EUR", "WMTX-EUR"]}
        trade, _ = await _until(ws, lambda f: f.get("event") == "trade")
        assert set(trade) == {"event", "timestamp", "market", "id", "amount", "price", "side"}
        candle, _ = await _until(ws, lambda f: f.get("event") == "candle" and f["interval"] == "1h")
        assert candle["candle"][0][0] % 3_600_000 == 0
        ticker, _ = await _until(ws, lambda f: f.get("event") == "ticker")
        assert set(ticker) - {"event", "market"} <= {"bestBid", "bestBidSize", "bestAsk", "bestAskSize", "lastPrice"}
        await ws.send_json({"action": "unsubscribe", "channels": [
            {"name": "candles", "interval": ["1m"], "markets": ["BTC-EUR"]},
            {"name": "ticker", "markets": ["BTC-EUR"]}]})
        ack, _ = await _until(ws, lambda f: f.get("event") == "unsubscribed")
        assert ack["subscriptions"] == {"candles": {"1h": ["BTC-EUR"]}, "trades": ["BTC-EUR", "WMTX-EUR"]}


async def test_account_channel_and_dead_man_switch(http: aiohttp.ClientSession, sim: SimHandle) -> None:
    async with http.ws_connect(sim.ws_url) as ws:
        await _authenticate(ws, sim)
        await ws.send_json({"action": "subscribe", "channels": [{"name": "account", "markets": ["ETH-EUR"]}]})
        await _until(ws, lambda f: f.get("event") == "subscribed")
        coid = str(uuid.uuid4())
        status, placed = await _rest(http, sim, "POST", "/order", {
            "market": "ETH-EUR", "side": "sell", "orderType": "limit", "amount": "0.01", "price": "9000",
            "clientOrderId": coid, "operatorId": OPERATOR})
        assert status == 200
        event, _ = await _until(ws, lambda f: f.get("event") == "order")
        assert (event["orderId"], event["status"], event["clientOrderId"], event["operatorId"]) == (
            placed["orderId"], "new", coid, OPERATOR)
        status, armed = await _rest(http, sim, "POST", "/cancelOrdersAfter", {"expiryAfterSeconds": 1})
        assert status == 200 and armed["expiryAfterSeconds"] == 1
        event, _ = await _until(ws, lambda f: f.get("event") == "order", timeout=3)
        assert (event["orderId"], event["status"]) == (placed["orderId"], "canceled")
        status, filled = await _rest(http, sim, "POST", "/order", {
            "market": "ETH-EUR", "side": "buy", "orderType": "market", "amountQuote": "20", "operatorId": OPERATOR})
        fill, _ = await _until(ws, lambda f: f.get("event") == "fill")
        assert (fill["orderId"], fill["taker"], fill["operatorId"]) == (filled["orderId"], True, OPERATOR)


async def test_market_status_control(http: aiohttp.ClientSession, sim: SimHandle) -> None:
    order = {"market": "XRP-EUR", "side": "buy", "orderType": "limit", "amount": "10", "price": "1",
             "operatorId": OPERATOR}
    sim.set_market_status("XRP-EUR", "halted")
    try:
        assert (await _rest(http, sim, "POST", "/order", order))[1]["errorCode"] == 423
        async with http.get(sim.rest_url + "/XRP-EUR/trades") as response:
            assert (response.status, (await response.json())["errorCode"]) == (409, 431)
    finally:
        sim.set_market_status("XRP-EUR", "trading")
    status, placed = await _rest(http, sim, "POST", "/order", order)
    assert status == 200 and placed["status"] == "new"
    assert (await _rest(http, sim, "DELETE", f"/orders?market=XRP-EUR&operatorId={OPERATOR}"))[1] == [
        {"orderId": placed["orderId"], "operatorId": OPERATOR}]


def test_control_rejects_bad_requests_and_sets_rate(sim: SimHandle) -> None:
    import urllib.error

    for bad in ({"nope": 1}, {"book_rate": -1}, {"skip_nonce": "NOPE-EUR"}, {"rest_errors": {"error_code": 205}}):
        with pytest.raises(urllib.error.HTTPError) as info:
            sim.control(**bad)
        assert info.value.code == 400
    sim.set_book_rate(25)
    assert sim.stats()["book_rate"] == 25
    sim.set_book_rate(20)


def test_sigterm_stops_cleanly(sim_factory: Callable[..., SimHandle]) -> None:
    handle = sim_factory(markets="BTC-EUR")
    started = time.monotonic()
    assert handle.stop() == 0
    assert time.monotonic() - started < 3
