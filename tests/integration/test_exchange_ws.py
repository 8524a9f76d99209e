"""Our asyncio WebSocket client and local books against the simulator over a real socket."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import pytest
from pydantic import SecretStr

from tests.integration.conftest import SimHandle
from trading.backoff import Backoff
from trading.exchange.errors import AuthenticationError, InvalidRequestError, UnknownActionError
from trading.exchange.governor import RateGovernor
from trading.exchange.live_book import LiveBooks
from trading.exchange.rest import BitvavoRest
from trading.exchange.ws import BitvavoWebSocket

MARKETS = ["BTC-EUR", "ETH-EUR", "XRP-EUR"]


async def eventually(condition: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def running(ws: BitvavoWebSocket) -> AsyncIterator[BitvavoWebSocket]:
    task = asyncio.create_task(ws.run())
    try:
        yield ws
    finally:
        await ws.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def fast_backoff() -> Backoff:
    return Backoff(base_s=0.05, cap_s=0.5)


async def test_local_books_equal_rest_after_10k_updates_with_gaps_and_a_drop(
        sim_factory: Callable[..., SimHandle]) -> None:
    sim = sim_factory(markets=",".join(MARKETS), book_rate=400)
    books = LiveBooks(MARKETS)
    events: dict[str, int] = {}

    def on_event(frame: dict[str, Any]) -> None:
        events[frame["event"]] = events.get(frame["event"], 0) + 1
        if frame["event"] == "book":
            books.on_book_event(frame)

    ws = BitvavoWebSocket(sim.ws_url, on_event=on_event, on_disconnect=books.reset_all, backoff=fast_backoff(),
                          governor=RateGovernor())
    books.attach(ws)
    await ws.subscribe("book", MARKETS)
    injected = 0
    async with running(ws):
        await eventually(lambda: all(s.is_live for s in books.syncs.values()), what="first snapshots")
        for round_ in range(8):
            market = MARKETS[round_ % len(MARKETS)]
            sim.skip_nonce(market)
            injected += 1
            await eventually(lambda n=injected: books.resyncs == n, what=f"gap {injected} detected")
            await eventually(lambda: all(s.is_live for s in books.syncs.values()), what="resync")
            if round_ == 3:
                sim.drop_connections()
                await eventually(lambda: ws.stats.reconnects == 1 and ws.connected, what="reconnect")
                await eventually(lambda: all(s.is_live for s in books.syncs.values()), what="books after reconnect")
            await eventually(lambda n=round_: books.stats.applied >= (n + 1) * 1300, what="more updates")
        await eventually(lambda: books.stats.applied >= 10_000, timeout_s=60, what="10,000 updates")
        sim.pause_feed()
        rest = BitvavoRest(sim.rest_url, governor=RateGovernor())
        for market in MARKETS:
            snapshot = await asyncio.to_thread(rest.book, market)
            sync = books.syncs[market]
            await eventually(lambda s=sync, n=snapshot.nonce: s.book.nonce == n, what=f"{market} caught up")
            assert sync.book.bids() == snapshot.bids
            assert sync.book.asks() == snapshot.asks
            assert not sync.book.is_crossed()
        sim.resume_feed()
    assert books.stats.applied >= 10_000
    assert books.resyncs == injected == 8
    assert ws.stats.reconnects == 1 and books.stats.parse_errors == 0


async def test_reconnect_resubscribes_exactly_the_same_channels(sim: SimHandle) -> None:
    seen: list[str] = []
    ws = BitvavoWebSocket(sim.ws_url, on_event=lambda f: seen.append(f["event"]), backoff=fast_backoff())
    await ws.subscribe("book", ["BTC-EUR", "ETH-EUR"])
    await ws.subscribe("ticker24h", ["BTC-EUR"])
    await ws.subscribe("candles", ["BTC-EUR"], interval="1m")
    async with running(ws):
        await eventually(lambda: bool(ws.acked_subscriptions), what="first ack")
        before = dict(ws.acked_subscriptions)
        assert before == {"book": ["BTC-EUR", "ETH-EUR"], "ticker24h": ["BTC-EUR"], "candles": {"1m": ["BTC-EUR"]}}
        ws.acked_subscriptions = {}
        sim.drop_connections()
        await eventually(lambda: ws.stats.reconnects == 1 and bool(ws.acked_subscriptions), what="re-ack")
        assert ws.acked_subscriptions == before
        seen.clear()
        await eventually(lambda: "ticker24h" in seen, what="ticker24h after reconnect")
        assert "ticker" not in seen      # the SDK's reconnect turns ticker24h into ticker (spec §8.2)
        await ws.unsubscribe("book", ["ETH-EUR"])
        await eventually(lambda: ws.acked_subscriptions.get("book") == ["BTC-EUR"], what="unsubscribe ack")


async def test_a_silent_connection_is_detected_and_replaced(sim: SimHandle) -> None:
    # Pings answered every 0.3 s must not hide that no data arrives.
    ws = BitvavoWebSocket(sim.ws_url, on_event=lambda f: None, silence_timeout_s=1.0, heartbeat_s=0.3,
                          backoff=fast_backoff())
    await ws.subscribe("book", ["BTC-EUR"])
    async with running(ws):
        await eventually(lambda: ws.connected, what="connect")
        sim.pause_feed()
        try:
            await eventually(lambda: ws.stats.silent_disconnects >= 1 and ws.stats.reconnects >= 1,
                             what="silence detection")
        finally:
            sim.resume_feed()
        await eventually(lambda: ws.connected, what="reconnect")


async def test_error_frames_surface_as_typed_errors(sim: SimHandle) -> None:
    errors: list[dict[str, Any]] = []
    ws = BitvavoWebSocket(sim.ws_url, on_event=lambda f: None, on_error_frame=errors.append)
    async with running(ws):
        await ws.wait_connected(10)
        await ws.subscribe("book", ["NOPE-EUR"])
        await eventually(lambda: bool(errors), what="subscribe error")
        assert errors[0]["errorCode"] == 205 and errors[0]["action"] == "subscribe"
        with pytest.raises(InvalidRequestError) as bad:
            await ws.request("getBook", market="NOPE-EUR")
        assert bad.value.error_code == 205
        with pytest.raises(UnknownActionError):
            await ws.request("nope")
        book = await ws.request("getBook", market="BTC-EUR", depth=3)   # the socket still answers
        assert len(book["bids"]) == 3


async def test_authenticated_socket_receives_account_events(sim: SimHandle) -> None:
    events: list[dict[str, Any]] = []
    ws = BitvavoWebSocket(sim.ws_url, on_event=events.append, api_key=SecretStr(sim.api_key),
                          api_secret=SecretStr(sim.api_secret))
    await ws.subscribe("account", ["BTC-EUR"])
    async with running(ws):
        await ws.wait_connected(10)
        assert ws.authenticated
        rest = BitvavoRest(sim.rest_url, api_key=SecretStr(sim.api_key), api_secret=SecretStr(sim.api_secret),
                           operator_id=7, governor=RateGovernor())
        client_id = str(uuid.uuid4())
        await asyncio.to_thread(rest.place_order, "BTC-EUR", "buy", "market", amount_quote=Decimal("20"),
                                client_order_id=client_id)
        await eventually(lambda: any(e["event"] == "fill" for e in events), what="fill event")
        await eventually(lambda: any(e["event"] == "order" and e.get("clientOrderId") == client_id
                                     for e in events), what="order event with our clientOrderId")


async def test_wrong_credentials_fail_authentication_and_keep_retrying(sim: SimHandle) -> None:
    ws = BitvavoWebSocket(sim.ws_url, on_event=lambda f: None, api_key=SecretStr(sim.api_key),
                          api_secret=SecretStr("wrong"), backoff=fast_backoff())
    async with running(ws):
        await eventually(lambda: ws.stats.connects >= 2, what="retries")
        assert not ws.authenticated and not ws.connected
        assert f"{AuthenticationError.__name__}: [309]" in ws.stats.last_error


async def test_books_stop_being_live_when_the_exchange_goes_away(sim_factory: Callable[..., SimHandle]) -> None:
    sim = sim_factory(markets="BTC-EUR", book_rate=50)
    books = LiveBooks(["BTC-EUR"])
    ws = BitvavoWebSocket(sim.ws_url, on_event=books.on_book_event, on_disconnect=books.reset_all,
                          backoff=fast_backoff())
    books.attach(ws)
    await ws.subscribe("book", ["BTC-EUR"])
    async with running(ws):
        await eventually(lambda: books.syncs["BTC-EUR"].is_live, what="live book")
        sim.stop()
        await eventually(lambda: not books.syncs["BTC-EUR"].is_live, timeout_s=5, what="book invalidated")
        await asyncio.sleep(1.0)
        assert not books.syncs["BTC-EUR"].is_live and not ws.connected
