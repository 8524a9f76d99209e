"""Malformed and hostile input gets the spec's error codes, never a 500, and the simulator lives on."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import SimHandle
from trading.exchange.signing import signature, websocket_signature

OPERATOR = 7


def _headers(sim: SimHandle, method: str, path: str, body: str = "", *, key: str | None = None,
             secret: str | None = None, timestamp: Any = None, window: str | None = None,
             sig: str | None = None) -> dict[str, str]:
    ts = str(int(time.time() * 1000)) if timestamp is None else str(timestamp)
    headers = {
        "Bitvavo-Access-Key": sim.api_key if key is None else key,
        "Bitvavo-Access-Timestamp": ts,
        "Bitvavo-Access-Signature": sig or signature(secret or sim.api_secret, ts, method,
                                                     "/v2" + path, body),
    }
    if window is not None:
        headers["Bitvavo-Access-Window"] = window
    return headers


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _post_order(http: aiohttp.ClientSession, sim: SimHandle, body: Any) -> tuple[int, Any]:
    text = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
    async with http.post(sim.rest_url + "/order", data=text,
                         headers=_headers(sim, "POST", "/order", text)) as response:
        return response.status, await response.json(content_type=None)


async def _ws_call(ws: aiohttp.ClientWebSocketResponse, frame: Any) -> dict[str, Any]:
    """Send a frame and return the next reply that is not a stream event."""
    await ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))
    while True:
        reply: dict[str, Any] = await ws.receive_json(timeout=5)
        if "event" not in reply or reply["event"] in ("authenticate", "subscribed", "unsubscribed"):
            return reply


def _limit(**overrides: Any) -> dict[str, Any]:
    body = {"market": "BTC-EUR", "side": "buy", "orderType": "limit", "amount": "0.01", "price": "1000",
            "operatorId": OPERATOR}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.parametrize(("overrides", "code"), [
    ({"market": "NOPE-EUR"}, 205),
    ({"market": "btc-eur"}, 205),
    ({"amount": "-1"}, 205),
    ({"amount": "NaN"}, 205),
    ({"amount": "Infinity"}, 205),
    ({"amount": "abc"}, 205),
    ({"amount": 0.001}, 205),  # a float is not a decimal string
    ({"amount": True}, 205),
    ({"price": ["1000"]}, 205),
    ({"price": {"x": 1}}, 205),
    ({"price": "1000.5"}, 422),
    ({"amount": "0.000000001"}, 429),
    ({"amount": "0.00001"}, 212),
    ({"side": "up"}, 205),
    ({"side": 1}, 205),
    ({"orderType": "stopLoss"}, 205),
    ({"timeInForce": "GTD"}, 205),
    ({"postOnly": "maybe"}, 205),
    ({"operatorId": None}, 203),
    ({"operatorId": "abc"}, 205),
    ({"operatorId": 1.5}, 205),
    ({"clientOrderId": "not-a-uuid"}, 205),
    ({"clientOrderId": 12}, 205),
    ({"price": None}, 203),
    ({"side": None}, 203),
    ({"nonsense": 1}, 201),
    ({"amount": "1000"}, 216),
])
async def test_bad_order_parameters(http: aiohttp.ClientSession, sim: SimHandle, overrides: dict[str, Any],
                                    code: int) -> None:
    status, body = await _post_order(http, sim, _limit(**overrides))
    assert (status, body["errorCode"]) == (400, code), body
    assert isinstance(body["error"], str) and body["error"]


async def test_bad_bodies_and_queries(http: aiohttp.ClientSession, sim: SimHandle) -> None:
    for text in ("{not json", "[1, 2]", "null", '"text"'):
        status, body = await _post_order(http, sim, text)
        assert (status, body["errorCode"]) == (400, 102), text
    # operatorId is also mandatory on update and cancel
    query = f"/order?market=BTC-EUR&orderId={uuid.uuid4()}"
    async with http.delete(sim.rest_url + query, headers=_headers(sim, "DELETE", query)) as response:
        assert (response.status, (await response.json())["errorCode"]) == (400, 203)
    async with http.delete(sim.rest_url + query + "&operatorId=1",
                           headers=_headers(sim, "DELETE", query + "&operatorId=1")) as response:
        assert (response.status, (await response.json())["errorCode"]) == (404, 240)
    update = json.dumps({"market": "BTC-EUR", "orderId": str(uuid.uuid4()), "price": "1000"})
    async with http.put(sim.rest_url + "/order", data=update,
                        headers=_headers(sim, "PUT", "/order", update)) as response:
        assert (response.status, (await response.json())["errorCode"]) == (400, 203)
    for path, code in [("/BTC-EUR/book?depth=0", 205), ("/BTC-EUR/book?depth=1001", 205),
                       ("/BTC-EUR/book?depth=x", 205), ("/BTC-EUR/candles?interval=7m", 205),
                       ("/BTC-EUR/candles", 203), ("/BTC-EUR/trades?limit=-1", 205),
                       ("/BTC-EUR/trades?start=10&end=5", 205), ("/markets?market=NOPE-EUR", 205),
                       ("/ticker/book?market=NOPE-EUR", 205), ("/WMTX-EUR/book", 431)]:
        async with http.get(sim.rest_url + path) as response:
            body = await response.json()
            assert body["errorCode"] == code, (path, body)
            assert response.status == (409 if code == 431 else 400)
    async with http.get(sim.rest_url + "/WMTX-EUR/book") as response:
        assert (await response.json())["error"] == "getBook is not available for WMTX-EUR in state HALTED"


async def test_unknown_paths_are_html_404_without_rate_headers(http: aiohttp.ClientSession, sim: SimHandle) -> None:
    for method, path in [("GET", "/nope"), ("POST", "/time"), ("GET", "/deposit"), ("GET", "/NOPE/book")]:
        async with http.request(method, sim.rest_url + path) as response:
            assert response.status == 404
            assert response.content_type == "text/html"
            assert "bitvavo-ratelimit-remaining" not in response.headers
    async with http.get(sim.rest_url + "/time") as response:
        assert int(response.headers["bitvavo-ratelimit-limit"]) == 1000
        assert int(response.headers["bitvavo-ratelimit-resetat"]) % 60_000 == 0


async def test_auth_failures_in_order(http: aiohttp.ClientSession, sim: SimHandle) -> None:
    now = int(time.time() * 1000)
    cases: list[tuple[dict[str, str], int]] = [
        ({}, 300),
        (_headers(sim, "GET", "/balance", key="short"), 301),
        (_headers(sim, "GET", "/balance", key="x" * 64), 305),
        (_headers(sim, "GET", "/balance", timestamp="abc"), 302),
        (_headers(sim, "GET", "/balance", timestamp=""), 302),
        (_headers(sim, "GET", "/balance", window="50"), 303),
        (_headers(sim, "GET", "/balance", window="60001"), 303),
        (_headers(sim, "GET", "/balance", window="ten"), 303),
        (_headers(sim, "GET", "/balance", timestamp=now - 20_000), 304),
        (_headers(sim, "GET", "/balance", timestamp=now + 20_000), 304),
        (_headers(sim, "GET", "/balance", timestamp=now - 20_000, window="30000"), 200),
        (_headers(sim, "GET", "/balance", sig="abc"), 308),
        (_headers(sim, "GET", "/balance", sig="g" * 64), 308),
        (_headers(sim, "GET", "/balance", secret="wrong"), 309),
        (_headers(sim, "GET", "/balance?symbol=EUR"), 309),  # signed another path
    ]
    for headers, code in cases:
        async with http.get(sim.rest_url + "/balance", headers=headers) as response:
            body = await response.json()
            if code == 200:
                assert response.status == 200, body
            else:
                assert (response.status, body["errorCode"]) == (403, code), (headers, body)
    # a signed public call with a bad signature is refused too
    async with http.get(sim.rest_url + "/time", headers=_headers(sim, "GET", "/time", secret="wrong")) as response:
        assert (await response.json())["errorCode"] == 309
    # key states and permissions are switchable for the codes that need an account setting
    try:
        for state, code in (("unconfirmed", 306), ("ipBlocked", 307)):
            sim.control(api_key_state=state)
            async with http.get(sim.rest_url + "/balance", headers=_headers(sim, "GET", "/balance")) as response:
                assert (await response.json())["errorCode"] == code
        sim.control(api_key_state="active", api_key_permissions=["view"])
        status, body = await _post_order(http, sim, _limit())
        assert (status, body["errorCode"]) == (403, 310)
        sim.control(api_key_permissions=["trade"])
        async with http.get(sim.rest_url + "/balance", headers=_headers(sim, "GET", "/balance")) as response:
            assert (await response.json())["errorCode"] == 311
    finally:
        sim.control(api_key_state="active", api_key_permissions=["view", "trade"])


async def test_websocket_bad_frames(http: aiohttp.ClientSession, sim: SimHandle) -> None:
    async with http.ws_connect(sim.ws_url) as ws:
        assert await _ws_call(ws, "this is not json") == {"errorCode": 102, "error": "Invalid JSON."}
        assert (await _ws_call(ws, "[1,2]"))["errorCode"] == 102
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive_json(timeout=5))["errorCode"] == 102
        time_reply = await _ws_call(ws, {"action": "getTime", "requestId": 1})
        assert time_reply["action"] == "getTime" and time_reply["requestId"] == 1 and "time" in time_reply["response"]
        assert await _ws_call(ws, {"action": "nope", "requestId": 2}) == {
            "action": "unknown", "requestId": 2, "errorCode": 415, "error": "Invalid action. Please check the request."}
        assert (await _ws_call(ws, {"requestId": 3}))["errorCode"] == 415
        assert await _ws_call(ws, {"action": "getBook", "requestId": 90, "market": "NOPE-EUR"}) == {
            "action": "getBook", "requestId": 90, "market": "NOPE-EUR", "errorCode": 205,
            "error": "market parameter NOPE-EUR is invalid."}
        assert (await _ws_call(ws, {"action": "getBook", "market": "BTC-EUR", "depth": 5000}))["error"] == \
            "depth parameter 5000 is invalid."
        halted = await _ws_call(ws, {"action": "getBook", "requestId": 91, "market": "WMTX-EUR"})
        assert (halted["errorCode"], halted["market"]) == (431, "WMTX-EUR")
        for channels, code in [([{"name": "nope", "markets": ["BTC-EUR"]}], 205),
                               ([{"name": "book", "markets": ["NOPE-EUR"]}], 205),
                               ([{"name": "book", "markets": ["btc-eur"]}], 205),
                               ([{"name": "candles", "markets": ["BTC-EUR"]}], 203),
                               ([{"name": "candles", "interval": ["7m"], "markets": ["BTC-EUR"]}], 205),
                               ("book", 203),
                               ([{"name": "account", "markets": ["BTC-EUR"]}], 300)]:
            reply = await _ws_call(ws, {"action": "subscribe", "channels": channels})
            assert (reply["action"], reply["errorCode"]) == ("subscribe", code), (channels, reply)
        private = await _ws_call(ws, {"action": "privateGetBalance", "requestId": 4})
        assert (private["action"], private["requestId"], private["errorCode"]) == ("privateGetBalance", 4, 300)
        ts = int(time.time() * 1000)
        for frame, code in [({"key": sim.api_key, "signature": "0" * 64, "timestamp": ts}, 309),
                            ({"key": sim.api_key, "signature": websocket_signature(sim.api_secret, ts),
                              "timestamp": ts, "window": "5"}, 303),
                            ({"key": "k", "signature": "s", "timestamp": ts}, 301),
                            ({"signature": "s", "timestamp": ts}, 300)]:
            reply = await _ws_call(ws, {"action": "authenticate", **frame})
            assert (reply["action"], reply["errorCode"]) == ("authenticate", code)
        ok = await _ws_call(ws, {"action": "authenticate", "key": sim.api_key, "timestamp": ts, "window": "10000",
                                 "signature": websocket_signature(sim.api_secret, ts)})
        assert ok == {"event": "authenticate", "authenticated": True}
        bad_order = await _ws_call(ws, {"action": "privateCreateOrder", "requestId": 5, **_limit(amount="NaN")})
        assert (bad_order["requestId"], bad_order["market"], bad_order["errorCode"]) == (5, "BTC-EUR", 205)
        no_operator = await _ws_call(ws, {"action": "privateCreateOrder", **_limit(operatorId=None)})
        assert no_operator["errorCode"] == 203 and no_operator["error"] == "operatorId parameter is required."
        fees = await _ws_call(ws, {"action": "privateGetFees", "market": None})  # what SDK quirk 11 sends
        assert fees["response"]["taker"] == "0.0025"
        account = [{"name": "account", "markets": ["BTC-EUR"]}]
        subscribed = await _ws_call(ws, {"action": "subscribe", "channels": account})
        assert subscribed == {"event": "subscribed", "subscriptions": {"account": ["BTC-EUR"]}}
        assert not ws.closed
    async with http.get(sim.rest_url + "/time") as response:
        assert response.status == 200
    assert sim.stats()["markets"]["BTC-EUR"]["status"] == "trading"
