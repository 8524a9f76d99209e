"""Test control API outside /v2 (not rate limited, not authenticated; loopback only).

POST /_sim/faults takes a JSON object; every key is optional and they apply in the order listed
in docs/simulator.md. GET /_sim/stats returns the counters. Both answer with the stats.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from trading.decimals import format_decimal
from trading.exchange.errors import ERROR_SPECS
from trading.matching import MARKET_STATUSES
from trading.sim.auth import ALL_PERMISSIONS, KEY_STATES
from trading.sim.exchange import SimExchange
from trading.sim.feed import FeedLoop
from trading.sim.ws import WsHandler

# Codes a REST fault may answer with: the server-side failures of spec §3.
FAULT_ERROR_CODES = tuple(code for code, (status, _) in ERROR_SPECS.items() if status >= 500)


class ControlError(ValueError):
    pass


def _number(value: Any, name: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ControlError(f"{name} must be a number >= {minimum}")
    return float(value)


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ControlError(f"{name} must be a non-negative integer")
    return value


def _object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ControlError(f"{name} must be a JSON object")
    return value


class Control:
    def __init__(self, exchange: SimExchange, feed: FeedLoop, ws: WsHandler) -> None:
        self.exchange = exchange
        self.feed = feed
        self.ws = ws

    async def faults(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read() or b"{}")
            self.apply(_object(body, "body"))
        except (orjson.JSONDecodeError, ControlError) as error:
            return web.json_response({"error": str(error)}, status=400)
        return web.json_response(self.stats(), dumps=_dumps)

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats(), dumps=_dumps)

    def apply(self, body: dict[str, Any]) -> None:
        unknown = set(body) - set(self._appliers())
        if unknown:
            raise ControlError(f"unknown fault keys: {sorted(unknown)}")
        # Validate-then-apply per key, in the documented order.
        for key, applier in self._appliers().items():
            if key in body:
                applier(body[key])

    def _appliers(self) -> dict[str, Callable[[Any], None]]:
        return {
            "clear": self._clear,
            "pause_feed": self._pause_feed,
            "book_rate": self._book_rate,
            "step": self._step,
            "skip_nonce": self._skip_nonce,
            "market_status": self._market_status,
            "rest_errors": self._rest_errors,
            "rest_timeouts": self._rest_timeouts,
            "rest_delays": self._rest_delays,
            "rate_limit": self._rate_limit,
            "reset_rate_limits": self._reset_rate_limits,
            "api_key_state": self._api_key_state,
            "api_key_permissions": self._api_key_permissions,
            "drop_connections": self._drop_connections,
            "inject_frame": self._inject_frame,
        }

    def _clear(self, value: Any) -> None:
        if value:
            self.exchange.faults.clear()

    def _pause_feed(self, value: Any) -> None:
        if not isinstance(value, bool):
            raise ControlError("pause_feed must be true or false")
        self.exchange.faults.feed_paused = value

    def _book_rate(self, value: Any) -> None:
        self.feed.rate = _number(value, "book_rate", minimum=0.1)

    def _step(self, value: Any) -> None:
        for _ in range(_count(value, "step")):
            self.exchange.step_all()

    def _skip_nonce(self, value: Any) -> None:
        markets = [value] if isinstance(value, str) else value
        if not isinstance(markets, list) or any(not isinstance(m, str) or m not in self.exchange.specs
                                                for m in markets):
            raise ControlError("skip_nonce must be a served market or a list of them")
        for market in markets:
            self.exchange.faults.skip_nonce(market)

    def _market_status(self, value: Any) -> None:
        changes = _object(value, "market_status")
        for market, status in changes.items():
            if market not in self.exchange.specs or status not in MARKET_STATUSES:
                raise ControlError(f"market_status: {market!r} -> {status!r} is not allowed")
        for market, status in changes.items():
            self.exchange.engine.set_market_status(market, status)

    def _rest_errors(self, value: Any) -> None:
        spec = _object(value, "rest_errors")
        code = spec.get("error_code", 111)
        if code not in FAULT_ERROR_CODES:
            raise ControlError(f"rest_errors.error_code must be one of {list(FAULT_ERROR_CODES)}")
        self.exchange.faults.add_rest_errors(_count(spec.get("count", 1), "rest_errors.count"), code,
                                             bool(spec.get("execute", False)))

    def _rest_timeouts(self, value: Any) -> None:
        spec = _object(value, "rest_timeouts")
        self.exchange.faults.add_rest_timeouts(_count(spec.get("count", 1), "rest_timeouts.count"),
                                               _number(spec.get("seconds", 30), "rest_timeouts.seconds"),
                                               bool(spec.get("execute", False)))

    def _rest_delays(self, value: Any) -> None:
        spec = _object(value, "rest_delays")
        self.exchange.faults.add_rest_delays(_count(spec.get("count", 1), "rest_delays.count"),
                                             _number(spec.get("seconds", 2), "rest_delays.seconds"))

    def _rate_limit(self, value: Any) -> None:
        spec = _object(value, "rate_limit")
        limiter = self.exchange.limiter
        limit = spec.get("limit")
        key_ban = spec.get("key_ban_seconds")
        ip_ban = spec.get("ip_ban_seconds")
        limiter.configure(
            limit=None if limit is None else _count(limit, "rate_limit.limit"),
            key_ban_ms=None if key_ban is None else int(_number(key_ban, "rate_limit.key_ban_seconds") * 1000),
            ip_ban_ms=None if ip_ban is None else int(_number(ip_ban, "rate_limit.ip_ban_seconds") * 1000))

    def _reset_rate_limits(self, value: Any) -> None:
        if value:
            self.exchange.limiter.reset()

    def _api_key_state(self, value: Any) -> None:
        if value not in KEY_STATES:
            raise ControlError(f"api_key_state must be one of {list(KEY_STATES)}")
        self.exchange.api_key.state = value

    def _api_key_permissions(self, value: Any) -> None:
        if not isinstance(value, list) or not all(isinstance(v, str) and v in ALL_PERMISSIONS for v in value):
            raise ControlError(f"api_key_permissions must be a subset of {sorted(ALL_PERMISSIONS)}")
        self.exchange.api_key.permissions = frozenset(value)

    def _inject_frame(self, value: Any) -> None:
        """Send `value` (text, sent as is: it may be malformed on purpose) to every WebSocket."""
        if not isinstance(value, str):
            raise ControlError("inject_frame must be a string (the raw frame text)")
        for connection in list(self.ws.connections):
            connection.send(value)

    def _drop_connections(self, value: Any) -> None:
        if value not in (True, "abort", "close"):
            raise ControlError('drop_connections must be true, "abort" or "close"')
        self.ws.drop_all(graceful=value == "close")

    def stats(self) -> dict[str, Any]:
        exchange = self.exchange
        markets = {}
        for market, feed in exchange.feeds.items():
            generator = exchange.generators.get(market)
            bid, ask = exchange.engine.best_bid(market), exchange.engine.best_ask(market)
            markets[market] = {
                "status": exchange.engine.rules(market).status,
                "nonce": feed.nonce,
                "book_events": feed.published,
                "trades": feed.trades,
                "steps": generator.steps if generator else 0,
                "regime": generator.regime.name if generator else None,
                "best_bid": format_decimal(bid[0]) if bid else None,
                "best_ask": format_decimal(ask[0]) if ask else None,
            }
        return {
            "markets": markets,
            "connections": len(self.ws.connections),
            "book_rate": self.feed.rate,
            "faults": exchange.faults.snapshot(),
            "rate_limit": {"limit": exchange.limiter.limit, "budgets": exchange.limiter.snapshot()},
            "api_key": {"state": exchange.api_key.state, "permissions": sorted(exchange.api_key.permissions)},
        }


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()
