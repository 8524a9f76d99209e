"""WebSocket at /v2/ (spec §7): actions, authenticate, subscribe/unsubscribe, and the event streams.

Each connection has one outgoing queue drained by a writer task, so replies and events leave in
the order they were produced (a getBook reply follows every book event it already includes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from trading.exchange.errors import BitvavoError, ban_message, error_body
from trading.exchange.intervals import CANDLE_INTERVALS
from trading.exchange.signing import WEBSOCKET_SIGN_PATH
from trading.exchange.weights import ws_action_weight
from trading.sim import auth
from trading.sim import params as P
from trading.sim.api import ACTIONS, SimApi
from trading.sim.exchange import SimExchange
from trading.sim.hub import CANDLES_PREFIX, CHANNELS

log = logging.getLogger(__name__)

HEARTBEAT_S = 50.0  # protocol ping interval, as the live server does
MAX_QUEUED = 20_000  # a consumer this far behind is disconnected instead of growing memory
_INVALID_JSON = orjson.dumps(error_body(102)).decode()


class WsConnection:
    def __init__(self, ws: web.WebSocketResponse, remote: str, transport: asyncio.BaseTransport | None) -> None:
        self.ws = ws
        self.remote = remote
        self.transport = transport
        self.authenticated = False
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._closed = False

    def send(self, text: str) -> None:
        if self._closed:
            return
        if self._queue.qsize() >= MAX_QUEUED:
            log.warning("dropping slow WebSocket consumer %s", self.remote)
            self.abort()
            return
        self._queue.put_nowait(text)

    def send_json(self, payload: dict[str, Any]) -> None:
        self.send(orjson.dumps(payload).decode())

    async def write_loop(self) -> None:
        while (text := await self._queue.get()) is not None:
            try:
                await self.ws.send_str(text)
            except (ConnectionError, RuntimeError):
                return

    def finish(self) -> None:
        self._closed = True
        self._queue.put_nowait(None)

    def abort(self) -> None:
        """Drop the TCP connection without a close frame (what a network failure looks like)."""
        self._closed = True
        if self.transport is not None:
            self.transport.close()


class WsHandler:
    def __init__(self, exchange: SimExchange, api: SimApi) -> None:
        self.exchange = exchange
        self.api = api
        self.connections: set[WsConnection] = set()
        self._closing: set[asyncio.Task[bool]] = set()  # graceful closes in flight (kept referenced)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, autoping=True)
        await ws.prepare(request)
        conn = WsConnection(ws, request.remote or "unknown", request.transport)
        self.connections.add(conn)
        writer = asyncio.create_task(conn.write_loop())
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    self.on_text(conn, message.data)
                elif message.type == WSMsgType.BINARY:
                    conn.send(_INVALID_JSON)
                elif message.type == WSMsgType.ERROR:
                    break
        finally:
            self.exchange.hub.remove(conn)
            self.connections.discard(conn)
            conn.finish()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        return ws

    def drop_all(self, *, graceful: bool) -> None:
        for conn in list(self.connections):
            if graceful:
                conn.finish()
                task = asyncio.get_running_loop().create_task(conn.ws.close(code=1001, message=b"going away"))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            else:
                conn.abort()

    async def close_all(self) -> None:
        await asyncio.gather(*(c.ws.close(code=1001, message=b"server shutdown") for c in list(self.connections)),
                             return_exceptions=True)

    # frames
    def on_text(self, conn: WsConnection, data: str) -> None:
        try:
            frame = orjson.loads(data)
        except orjson.JSONDecodeError:
            frame = None
        if not isinstance(frame, dict):
            conn.send(_INVALID_JSON)
            return
        action = frame.get("action")
        request_id = frame.get("requestId")
        params = {k: v for k, v in frame.items() if k not in ("action", "requestId") and v is not None}
        echo: dict[str, Any] = {"action": action if isinstance(action, str) else "unknown"}
        if request_id is not None:
            echo["requestId"] = request_id
        if isinstance(params.get("market"), str):
            echo["market"] = params["market"]
        identity = self.exchange.key_identity if conn.authenticated else "ip:" + conn.remote
        weight = ws_action_weight(action, params) if isinstance(action, str) else 1
        rate = self.exchange.limiter.charge(identity, weight, is_key=conn.authenticated)
        try:
            if rate.banned:
                raise P.api_error(105, ban_message(rate.banned_until_ms))
            self._dispatch(conn, action, params, echo)
        except BitvavoError as error:
            conn.send_json({**echo, **error_body(error.error_code, error.message)})
        except Exception:  # a simulator bug: answer like the exchange would, keep the socket
            log.exception("unhandled error in WebSocket action %r", action)
            conn.send_json({**echo, **error_body(101)})

    def _dispatch(self, conn: WsConnection, action: Any, params: P.Params, echo: dict[str, Any]) -> None:
        if action == "authenticate":
            self._authenticate(conn, params)
        elif action == "subscribe":
            self._subscribe(conn, params)
        elif action == "unsubscribe":
            self._unsubscribe(conn, params)
        else:
            endpoint = ACTIONS.get(action) if isinstance(action, str) else None
            if endpoint is None:
                echo["action"] = "unknown"
                raise P.api_error(415)
            if endpoint.permission is not None:
                if not conn.authenticated:
                    raise auth.auth_error(300)
                auth.check_permission(self.exchange.api_key, endpoint.permission)
            response = endpoint.handler(self.api, params)
            conn.send_json({k: v for k, v in echo.items() if k != "market"} | {"response": response})

    def _authenticate(self, conn: WsConnection, params: P.Params) -> None:
        auth.verify(self.exchange.api_key, key=params.get("key"), timestamp=params.get("timestamp"),
                    sig=params.get("signature"), window=params.get("window"), method="GET",
                    path_with_query=WEBSOCKET_SIGN_PATH, bodies=("",), now_ms=self.exchange.clock_ms())
        conn.authenticated = True
        conn.send_json({"event": "authenticate", "authenticated": True})

    def _channel_plan(self, conn: WsConnection, params: P.Params, *, subscribing: bool
                      ) -> list[tuple[list[str], list[str] | None]]:
        """Validate every channel before changing anything: [(channel keys, markets or None=all)]."""
        channels = params.get("channels")
        if not isinstance(channels, list) or not channels:
            raise P.required("channels")
        plan: list[tuple[list[str], list[str] | None]] = []
        for channel in channels:
            name = channel.get("name") if isinstance(channel, dict) else None
            if name not in CHANNELS:
                raise P.api_error(205, "channel.name parameter is invalid.")
            assert isinstance(channel, dict)
            markets = channel.get("markets")
            if markets is None and not subscribing:
                chosen: list[str] | None = None
            elif not isinstance(markets, list) or not markets:
                raise P.required("markets")
            else:
                for market in markets:
                    if not isinstance(market, str) or market not in self.exchange.specs:
                        raise P.invalid_market(market)
                chosen = list(markets)
            keys = [name]
            if name == "candles":
                intervals = channel.get("interval")
                if not isinstance(intervals, list) or not intervals:
                    raise P.required("interval")
                for interval in intervals:
                    if interval not in CANDLE_INTERVALS:
                        raise P.invalid("interval", interval if isinstance(interval, str) else None)
                keys = [CANDLES_PREFIX + interval for interval in intervals]
            if name == "account" and subscribing and not conn.authenticated:
                raise auth.auth_error(300)
            plan.append((keys, chosen))
        return plan

    def _subscribe(self, conn: WsConnection, params: P.Params) -> None:
        hub = self.exchange.hub
        new_tickers: list[str] = []
        for keys, markets in self._channel_plan(conn, params, subscribing=True):
            for key in keys:
                added = hub.subscribe(conn, key, markets or [])
                if key == "ticker":
                    new_tickers.extend(added)
                elif key == "ticker24h":
                    for market in added:
                        self.exchange.forget_ticker24h(market)
        conn.send_json({"event": "subscribed", "subscriptions": hub.subscriptions(conn)})
        for market in new_tickers:
            frame = self.exchange.ticker_frame(market)
            if len(frame) > 2:
                conn.send_json(frame)

    def _unsubscribe(self, conn: WsConnection, params: P.Params) -> None:
        hub = self.exchange.hub
        for keys, markets in self._channel_plan(conn, params, subscribing=False):
            for key in keys:
                hub.unsubscribe(conn, key, markets)
        conn.send_json({"event": "unsubscribed", "subscriptions": hub.subscriptions(conn)})
