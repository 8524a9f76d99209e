"""The aiohttp application: REST and WebSocket under /v2 on one port, the control API under /_sim."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from trading.sim.api import SimApi
from trading.sim.control import Control
from trading.sim.exchange import SimExchange
from trading.sim.feed import FeedLoop
from trading.sim.rest import RestHandler, not_found
from trading.sim.ws import WsHandler


def _is_websocket(request: web.Request) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


def build_app(exchange: SimExchange, book_rate: float) -> web.Application:
    api = SimApi(exchange)
    shutdown = asyncio.Event()
    rest = RestHandler(exchange, api, shutdown)
    ws = WsHandler(exchange, api)
    feed = FeedLoop(exchange, book_rate)
    control = Control(exchange, feed, ws)

    async def v2(request: web.Request) -> web.StreamResponse:
        tail = request.match_info.get("tail", "")
        if tail == "":
            return await ws.handle(request) if _is_websocket(request) else not_found()
        return await rest.handle(request, "/" + tail)

    async def background(app: web.Application) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(feed.run_book()), asyncio.create_task(feed.run_ticker24h())]
        yield
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def on_shutdown(app: web.Application) -> None:
        shutdown.set()
        await ws.close_all()

    app = web.Application()
    app.router.add_route("*", "/v2", v2)
    app.router.add_route("*", "/v2/{tail:.*}", v2)
    app.router.add_post("/_sim/faults", control.faults)
    app.router.add_get("/_sim/stats", control.get_stats)
    app.cleanup_ctx.append(background)
    app.on_shutdown.append(on_shutdown)
    return app
