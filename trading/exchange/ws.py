"""Asyncio WebSocket client for Bitvavo (spec §7), replacing the SDK's threaded one (spec §8).

- One socket carries every market. `run()` connects, authenticates when credentials are given,
  sends ONE subscribe frame with exactly the desired subscriptions, then reads until the socket
  drops, goes silent, or `close()` is called; it reconnects with capped exponential backoff and
  full jitter, and resubscribes the same channels.
- `request(action, **params)` sends an action with a `requestId` and returns its `response`, or
  raises the typed `BitvavoError` of the error frame. Requests in flight when the socket drops
  fail with `ConnectionResetError`.
- Stream events go to `on_event(frame)` (a plain callable: it is the hot path). Error frames
  that answer no request (e.g. a rejected subscribe) go to `on_error_frame`. The read loop gives
  other tasks a turn every 100 frames, so a feed that never runs dry cannot starve them.
- A socket with subscriptions that delivers nothing for `silence_timeout_s` is treated as dead.
  Protocol pings keep idle sockets honest (aiohttp heartbeat).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import orjson
from pydantic import SecretStr

from trading.backoff import Backoff
from trading.clock import now_ms
from trading.exchange.errors import BitvavoError, OutcomeUncertainError, RateLimitBannedError, error_from_payload
from trading.exchange.governor import RateGovernor
from trading.exchange.signing import websocket_signature
from trading.exchange.weights import ws_action_weight
from trading.log_sampling import worth_logging

log = logging.getLogger(__name__)

Channel = tuple[str, str | None]  # (name, interval) — interval only for candles
DisconnectHook = Callable[[], None]
# Called after every stream event; when it returns an awaitable the reader awaits it before
# reading on (the consumer's backpressure: e.g. "flush, I have too much pending").
FlowControl = Callable[[], Awaitable[None] | None]

# Actions whose effect is not safe to assume either way when the reply is lost.
_UNSAFE_ACTIONS = frozenset({"privateCreateOrder", "privateUpdateOrder", "privateCancelOrder",
                             "privateCancelOrders", "privateCancelOrdersAfter"})
# The read loop lets other tasks run after this many frames in a row (a few ms of work).
_FRAMES_PER_YIELD = 100
# A socket carrying only these channels may be silent for long and still be healthy.
_QUIET_CHANNELS = frozenset({"account"})
EventHandler = Callable[[dict[str, Any]], None]
_Socket = aiohttp.ClientWebSocketResponse[Literal[False]]  # text frames as bytes (decode_text=False)
ConnectHook = Callable[[], Awaitable[None] | None]


@dataclass
class WsStats:
    connects: int = 0
    reconnects: int = 0
    silent_disconnects: int = 0
    messages: int = 0
    malformed_frames: int = 0
    error_frames: int = 0
    handler_errors: int = 0
    last_message_ms: int = 0
    disconnected_at_ms: int = 0  # when the previous connection ended (0 before the first drop)
    last_error: str = ""


class WebSocketClosedError(ConnectionResetError):
    pass


class BitvavoWebSocket:
    def __init__(self, url: str, *, on_event: EventHandler, api_key: SecretStr | None = None,
                 api_secret: SecretStr | None = None, governor: RateGovernor | None = None,
                 on_error_frame: EventHandler | None = None, on_connect: ConnectHook | None = None,
                 on_disconnect: DisconnectHook | None = None, flow_control: FlowControl | None = None,
                 backoff: Backoff | None = None,
                 silence_timeout_s: float = 30.0, heartbeat_s: float = 20.0, request_timeout_s: float = 10.0,
                 access_window_ms: int = 10_000, clock_offset_ms: int = 0) -> None:
        self.url = url
        self._on_event = on_event
        self._on_error_frame = on_error_frame
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._flow_control = flow_control
        self._api_key = api_key
        self._api_secret = api_secret
        self._governor = governor
        self.backoff = backoff or Backoff()
        self.silence_timeout_s = silence_timeout_s
        self.heartbeat_s = heartbeat_s
        self.request_timeout_s = request_timeout_s
        self.access_window_ms = access_window_ms
        self.clock_offset_ms = clock_offset_ms  # exchange clock minus ours, as BitvavoRest.sync_clock measures
        self.stats = WsStats()
        self.subscriptions: dict[Channel, set[str]] = {}
        self.acked_subscriptions: dict[str, Any] = {}
        self.authenticated = False
        self._ws: _Socket | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._auth_future: asyncio.Future[None] | None = None
        self._next_request_id = 1
        self._closing = False
        self._connected = asyncio.Event()

    # public API --------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed and self._connected.is_set()

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        async with asyncio.timeout(timeout_s):  # not wait_for: on Python 3.11 it can lose a cancel
            await self._connected.wait()

    async def subscribe(self, name: str, markets: Iterable[str], interval: str | None = None) -> None:
        wanted = set(markets)
        new = wanted - self.subscriptions.get((name, interval), set())
        self.subscriptions.setdefault((name, interval), set()).update(wanted)
        if new and self.connected:
            await self._send_subscription("subscribe", {(name, interval): new})

    async def unsubscribe(self, name: str, markets: Iterable[str], interval: str | None = None) -> None:
        current = self.subscriptions.get((name, interval), set())
        gone = current & set(markets)
        current -= gone
        if not current:
            self.subscriptions.pop((name, interval), None)
        if gone and self.connected:
            await self._send_subscription("unsubscribe", {(name, interval): gone})

    async def request(self, action: str, **params: Any) -> Any:
        """Send `action` and return its reply's `response`.

        `WebSocketClosedError` means the request was NOT sent. For an order action that was sent
        but whose reply was lost (socket dropped, timeout), `OutcomeUncertainError` is raised:
        look the order up before acting again.
        """
        connection = self._ws
        if connection is None or connection.closed or not self.connected:
            raise WebSocketClosedError(f"{action}: not connected")
        request_id = self._next_request_id
        self._next_request_id += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        sent = False
        try:
            await self._send({"action": action, "requestId": request_id, **params},
                             weight=ws_action_weight(action, params), connection=connection)
            sent = True
            async with asyncio.timeout(self.request_timeout_s):
                return await future
        except (TimeoutError, WebSocketClosedError) as exc:
            if sent and action in _UNSAFE_ACTIONS:
                raise OutcomeUncertainError(109, f"{action} was sent but its reply was lost: {exc!r}") from exc
            raise
        finally:
            self._pending.pop(request_id, None)

    async def run(self) -> None:
        """Connect and keep connected until `close()`; never returns otherwise."""
        self._closing = False
        async with aiohttp.ClientSession() as session:
            while not self._closing:
                try:
                    await self._connect_and_read(session)
                except (TimeoutError, aiohttp.ClientError, OSError, BitvavoError) as exc:
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("websocket %s: %s", self.url, self.stats.last_error)
                finally:
                    self._on_disconnected()
                if self._closing:
                    break
                self.stats.reconnects += 1
                await asyncio.sleep(self.backoff.next_delay())

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            await self._ws.close()

    async def drop_connection(self) -> None:
        """Close the current socket; `run()` reconnects (used when a consumer detects a stale feed)."""
        if self._ws is not None:
            await self._ws.close()

    # connection lifecycle ----------------------------------------------------------------------

    async def _connect_and_read(self, session: aiohttp.ClientSession) -> None:
        # decode_text=False: text frames arrive as bytes, which orjson parses without a str copy.
        self._ws = await session.ws_connect(self.url, heartbeat=self.heartbeat_s, autoping=True,
                                            max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                                            decode_text=False)
        self.stats.connects += 1
        self.stats.last_message_ms = now_ms()
        connection = self._ws
        reader = asyncio.create_task(self._read_loop(connection))
        watchdog = asyncio.create_task(self._watch_silence(connection))
        try:
            if self._api_key is not None and self._api_secret is not None:
                await self._authenticate()
            if self._on_connect is not None:
                result = self._on_connect()
                if result is not None:
                    await result
            sent = {channel: set(markets) for channel, markets in self.subscriptions.items()}
            if sent:
                await self._send_subscription("subscribe", sent, connection=connection)
            self._connected.set()
            # subscribe()/unsubscribe() calls made while we were connecting only changed the wish list.
            await self._send_difference(sent, connection)
            log.info("websocket connected to %s (%d channel groups)", self.url, len(self.subscriptions))
            await reader
        finally:
            for task in (reader, watchdog):
                task.cancel()
            await asyncio.gather(reader, watchdog, return_exceptions=True)  # a cancel of run() still propagates

    def _on_disconnected(self) -> None:
        if self._ws is not None:
            self.stats.disconnected_at_ms = now_ms()
            if self._on_disconnect is not None:
                self._on_disconnect()
        self._connected.clear()
        self.authenticated = False
        self._ws = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(WebSocketClosedError("websocket closed before the reply"))
        self._pending.clear()
        if self._auth_future is not None and not self._auth_future.done():
            self._auth_future.set_exception(WebSocketClosedError("websocket closed during authenticate"))

    async def _watch_silence(self, ws: _Socket) -> None:
        """Close a socket whose market-data subscriptions deliver nothing for `silence_timeout_s`.

        Not the receive timeout: aiohttp restarts that on every PONG, so a server that answers
        pings but stopped sending data would never count as silent.
        """
        limit_ms = self.silence_timeout_s * 1000
        while not ws.closed:
            await asyncio.sleep(min(1.0, self.silence_timeout_s / 4))
            expects_traffic = any(name not in _QUIET_CHANNELS for name, _ in self.subscriptions)
            if expects_traffic and now_ms() - self.stats.last_message_ms > limit_ms:
                self.stats.silent_disconnects += 1
                self.stats.last_error = f"no message for {self.silence_timeout_s}s"
                await ws.close()
                return

    async def _read_loop(self, ws: _Socket) -> None:
        started = asyncio.get_running_loop().time()
        since_yield = 0
        while True:
            message = await ws.receive()
            if message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                self._dispatch(message.data)
                if self._flow_control is not None:
                    pause = self._flow_control()
                    if pause is not None:
                        await pause
                # receive() does not suspend while frames are queued, so a busy feed would starve every
                # other task (the consumer's Redis writes, lease renewal, timers): give them a turn.
                since_yield += 1
                if since_yield >= _FRAMES_PER_YIELD:
                    since_yield = 0
                    await asyncio.sleep(0)
                # A connection that stayed up a while earns a fresh backoff.
                if self.backoff.attempt and asyncio.get_running_loop().time() - started > 10:
                    self.backoff.reset()
            elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                                  aiohttp.WSMsgType.ERROR):
                return

    def _dispatch(self, data: str | bytes) -> None:
        try:
            frame = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.stats.malformed_frames += 1
            return
        if not isinstance(frame, dict):
            self.stats.malformed_frames += 1
            return
        self.stats.messages += 1
        self.stats.last_message_ms = now_ms()
        if "event" in frame and "errorCode" not in frame:
            event = frame["event"]
            if event == "subscribed" or event == "unsubscribed":
                self.acked_subscriptions = frame.get("subscriptions", {})
            elif event == "authenticate":
                self._resolve_auth(frame)
            else:
                try:
                    self._on_event(frame)
                except Exception:
                    # A consumer bug must not take market data down with it: count, log, read on.
                    self.stats.handler_errors += 1
                    if worth_logging(self.stats.handler_errors):
                        log.exception("websocket event handler failed (%d so far)", self.stats.handler_errors)
            return
        request_id = frame.get("requestId")
        future = self._pending.get(request_id) if isinstance(request_id, int) else None
        if "errorCode" in frame:
            self.stats.error_frames += 1
            error = error_from_payload(frame)
            if isinstance(error, RateLimitBannedError) and self._governor is not None:
                self._governor.observe_ban(error.banned_until_ms)
            if future is not None and not future.done():
                future.set_exception(error)
            elif frame.get("action") == "authenticate":
                self._resolve_auth(frame)
            elif self._on_error_frame is not None:
                self._on_error_frame(frame)
            else:
                log.warning("websocket error frame: %s", error)
            return
        if future is not None and not future.done():
            future.set_result(frame.get("response"))

    # protocol helpers --------------------------------------------------------------------------

    async def _send(self, frame: dict[str, Any], *, weight: int = 1,
                    connection: _Socket | None = None) -> None:
        """Send on `connection` (default: the current socket). A frame meant for a socket that was
        replaced while we waited for rate budget is not sent on the new one."""
        target = connection or self._ws
        if self._governor is not None:
            await self._governor.acquire_async(weight)
        if target is None or target.closed or target is not self._ws:
            raise WebSocketClosedError(f"{frame.get('action')}: socket closed before sending")
        await target.send_str(orjson.dumps(frame).decode())

    async def _send_difference(self, sent: dict[Channel, set[str]],
                               connection: _Socket) -> None:
        added: dict[Channel, set[str]] = {}
        removed: dict[Channel, set[str]] = {}
        for channel in set(sent) | set(self.subscriptions):
            wanted, had = self.subscriptions.get(channel, set()), sent.get(channel, set())
            if wanted - had:
                added[channel] = wanted - had
            if had - wanted:
                removed[channel] = had - wanted
        if added:
            await self._send_subscription("subscribe", added, connection=connection)
        if removed:
            await self._send_subscription("unsubscribe", removed, connection=connection)

    async def _send_subscription(self, action: str, channels: dict[Channel, set[str]], *,
                                 connection: _Socket | None = None) -> None:
        payload = []
        for (name, interval), markets in sorted(channels.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
            entry: dict[str, Any] = {"name": name, "markets": sorted(markets)}
            if interval is not None:
                entry["interval"] = [interval]
            payload.append(entry)
        await self._send({"action": action, "channels": payload}, connection=connection)

    async def _authenticate(self) -> None:
        assert self._api_key is not None and self._api_secret is not None
        timestamp = now_ms() + self.clock_offset_ms
        self._auth_future = asyncio.get_running_loop().create_future()
        await self._send({"action": "authenticate", "key": self._api_key.get_secret_value(),
                          "signature": websocket_signature(self._api_secret.get_secret_value(), timestamp),
                          "timestamp": timestamp, "window": str(self.access_window_ms)})
        async with asyncio.timeout(self.request_timeout_s):
            await self._auth_future
        self.authenticated = True

    def _resolve_auth(self, frame: dict[str, Any]) -> None:
        future = self._auth_future
        if future is None or future.done():
            return
        if frame.get("authenticated") is True:
            future.set_result(None)
        else:
            future.set_exception(error_from_payload(frame) if "errorCode" in frame
                                 else BitvavoError(309, "authentication refused"))
