"""The simulator answers like the recorded live API: same error bodies, same payload shapes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.fixtures import ccxt_responses, market_snapshot, wire_captures
from tests.integration.conftest import SimHandle
from trading.exchange.signing import signature

# Requests that produced the recorded WebSocket error frames (by the capture's note).
WS_REQUESTS = {
    "getBook on a halted market": {"action": "getBook", "requestId": 91, "market": "WMTX-EUR"},
    "subscribe book NOPE-EUR": {"action": "subscribe", "channels": [{"name": "book", "markets": ["NOPE-EUR"]}]},
    "subscribe book btc-eur (lower case)": {"action": "subscribe",
                                            "channels": [{"name": "book", "markets": ["btc-eur"]}]},
    "subscribe channel name nope": {"action": "subscribe", "channels": [{"name": "nope", "markets": ["BTC-EUR"]}]},
    "getBook NOPE-EUR": {"action": "getBook", "requestId": 90, "market": "NOPE-EUR"},
    "getBook with depth 5000": {"action": "getBook", "requestId": 92, "market": "BTC-EUR", "depth": 5000},
    "unknown action nope": {"action": "nope"},
    "text that is not JSON; socket stays open": "this is not json",
}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _signed(http: aiohttp.ClientSession, sim: SimHandle, method: str, path: str,
                  body: dict[str, Any] | None = None) -> Any:
    text = json.dumps(body) if body else ""
    ts = str(int(time.time() * 1000))
    headers = {"Bitvavo-Access-Key": sim.api_key, "Bitvavo-Access-Timestamp": ts,
               "Bitvavo-Access-Signature": signature(sim.api_secret, ts, method, "/v2" + path, text)}
    async with http.request(method, sim.rest_url + path, data=text or None, headers=headers) as response:
        assert response.status == 200
        return await response.json()


async def test_recorded_rest_errors_replay_identically(http: aiohttp.ClientSession, sim: SimHandle) -> None:
    rest = [c for c in wire_captures() if c["transport"] == "rest"]
    assert len(rest) == 8
    for capture in rest:
        method, path = capture["request"].split(" ")
        async with http.request(method, sim.rest_url + path.removeprefix("/v2")) as response:
            body = await response.json()
            assert response.status == capture["status"], capture
            if capture["status"] == 200:
                assert set(body) == set(capture["body"])
            else:
                assert body == capture["body"]


async def test_recorded_websocket_errors_replay_identically(http: aiohttp.ClientSession, sim: SimHandle) -> None:
    frames = {c["note"]: c["frame"] for c in wire_captures() if c.get("direction") == "server->client"}
    async with http.ws_connect(sim.ws_url) as ws:
        for note, request in WS_REQUESTS.items():
            await ws.send_str(request if isinstance(request, str) else json.dumps(request))
            assert await ws.receive_json(timeout=5) == frames[note], note
        await ws.send_json({"action": "getTime"})
        reply = await ws.receive_json(timeout=5)
        assert set(reply) == {"action", "response"} and set(reply["response"]) == set(
            frames['reply to {"action":"getTime"}']["response"])
        await ws.send_json({"action": "getBook", "requestId": 1, "market": "BTC-EUR", "depth": 3})
        reply = await ws.receive_json(timeout=5)
        recorded = frames["snapshot reply; prices not padded; timestamp in ns"]
        assert set(reply) == set(recorded) and set(reply["response"]) == set(recorded["response"])
        assert len(reply["response"]["bids"]) == 3


async def test_public_shapes_match_the_snapshot(http: aiohttp.ClientSession, sim: SimHandle) -> None:
    snapshot = market_snapshot()["deep"]["BTC-EUR"]
    candles: list[Any] = []
    deadline = time.monotonic() + 5
    while not candles and time.monotonic() < deadline:  # the first simulated trade may take a moment
        async with http.get(sim.rest_url + "/BTC-EUR/candles?interval=1m&limit=3") as response:
            candles = await response.json()
        await asyncio.sleep(0.05)
    recorded = snapshot["candles"]["5m"][0]
    assert candles and [type(v) for v in candles[0]] == [type(v) for v in recorded]
    async with http.get(sim.rest_url + "/BTC-EUR/book?depth=10") as response:
        book = await response.json()
    assert [type(v) for v in book["bids"][0]] == [type(v) for v in snapshot["orderBook"]["bids"][0]]
    async with http.get(sim.rest_url + "/assets?symbol=BTC") as response:
        asset = await response.json()
    assert set(asset) == set(ccxt_responses()["fetchCurrencies"][0])


async def test_private_shapes_match_the_ccxt_recordings(http: aiohttp.ClientSession, sim: SimHandle) -> None:
    recorded = ccxt_responses()
    coid = str(uuid.uuid4())
    limit = await _signed(http, sim, "POST", "/order", {
        "market": "BTC-EUR", "side": "buy", "orderType": "limit", "amount": "0.0003", "price": "30000",
        "clientOrderId": coid, "operatorId": 5})
    assert set(limit) - {"operatorId"} == set(recorded["createOrder"])
    assert limit["onHold"] == "9.03"  # 0.0003 × 30000 × 1.0025 rounded up (spec §5.5)
    edited = await _signed(http, sim, "PUT", "/order", {"market": "BTC-EUR", "orderId": limit["orderId"],
                                                         "price": "31000", "operatorId": 5})
    assert edited["onHold"] == "9.33"
    canceled = await _signed(http, sim, "DELETE", f"/order?market=BTC-EUR&orderId={limit['orderId']}&operatorId=5")
    assert set(canceled) == {"orderId", "clientOrderId", "operatorId"}
    market = await _signed(http, sim, "POST", "/order", {
        "market": "BTC-EUR", "side": "sell", "orderType": "market", "amount": "0.0002",
        "clientOrderId": str(uuid.uuid4()), "operatorId": 5})
    assert set(market) - {"operatorId"} == set(recorded["fetchOrders"][0])
    assert set(market["fills"][0]) == set(recorded["fetchOrders"][0]["fills"][0])
    fills = await _signed(http, sim, "GET", "/trades?market=BTC-EUR&limit=1")
    assert set(fills[0]) - {"operatorId"} == set(recorded["fetchMyTrades"][0])
    balances = await _signed(http, sim, "GET", "/balance")
    assert all(set(b) == set(recorded["fetchBalance"][0]) for b in balances)
