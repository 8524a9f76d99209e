"""REST under /v2 (spec §4): authentication, rate limit, injected faults, then the endpoint.

Every JSON response carries the rate-limit headers; unknown paths get a 404 HTML page without
them, as the live API does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from aiohttp import web

from trading.exchange.errors import BitvavoError, ban_message, error_body, http_status_for
from trading.exchange.signing import compact_body
from trading.exchange.weights import rest_template, rest_weight
from trading.sim import auth
from trading.sim.api import ENDPOINTS, Endpoint, SimApi
from trading.sim.exchange import SimExchange
from trading.sim.faults import RestFault
from trading.sim.params import api_error
from trading.sim.ratelimit import RateStatus

log = logging.getLogger(__name__)

NOT_FOUND_HTML = ("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
                  "<body><h1>404 Not Found</h1></body></html>\n")


def not_found() -> web.Response:
    return web.Response(status=404, text=NOT_FOUND_HTML, content_type="text/html")


def json_response(body: Any, status: int, rate: RateStatus | None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json",
                        headers=rate.headers() if rate is not None else None)


def error_response(error: BitvavoError, rate: RateStatus | None) -> web.Response:
    body = error_body(error.error_code, error.message)
    return json_response(body, error.http_status or http_status_for(error.error_code), rate)


def client_ip(request: web.Request) -> str:
    return request.remote or "unknown"


class RestHandler:
    def __init__(self, exchange: SimExchange, api: SimApi, shutdown: asyncio.Event) -> None:
        self.exchange = exchange
        self.api = api
        self.shutdown = shutdown

    async def handle(self, request: web.Request, path: str) -> web.StreamResponse:
        template = rest_template(path)
        endpoint = ENDPOINTS.get((request.method, template))
        if endpoint is None:
            return not_found()
        raw = await request.read()
        body, body_ok = _parse_body(raw)
        if request.method in ("POST", "PUT"):
            params: dict[str, Any] = dict(body) if isinstance(body, dict) else {}
        else:
            params = dict(request.query)
        if template.startswith("/{market}"):
            params["market"] = path.split("/")[1]

        ip_identity = "ip:" + client_ip(request)
        identity, is_key = ip_identity, False
        headers = request.headers
        if "Bitvavo-Access-Key" in headers:
            try:
                auth.verify(self.exchange.api_key, key=headers.get("Bitvavo-Access-Key"),
                            timestamp=headers.get("Bitvavo-Access-Timestamp"),
                            sig=headers.get("Bitvavo-Access-Signature"),
                            window=headers.get("Bitvavo-Access-Window"), method=request.method,
                            path_with_query=request.raw_path, bodies=_signed_forms(raw, body, body_ok),
                            now_ms=self.exchange.clock_ms())
                identity, is_key = self.exchange.key_identity, True
            except BitvavoError as error:
                return error_response(error, self._charge(ip_identity, 1, False))
        rate = self._charge(identity, rest_weight(request.method, template, params), is_key)
        if rate.banned:
            return error_response(api_error(105, ban_message(rate.banned_until_ms)), rate)
        try:
            if endpoint.permission is not None:
                if not is_key:
                    raise auth.auth_error(300)
                auth.check_permission(self.exchange.api_key, endpoint.permission)
            if request.method in ("POST", "PUT") and not (body_ok and isinstance(body, dict)):
                raise api_error(102)
        except BitvavoError as error:
            return error_response(error, rate)
        fault = self.exchange.faults.take_rest_fault()
        if fault is not None:
            return await self._inject(request, fault, endpoint, params, rate)
        return self._run(endpoint, params, rate)

    def _charge(self, identity: str, weight: int, is_key: bool) -> RateStatus:
        return self.exchange.limiter.charge(identity, weight, is_key=is_key)

    def _run(self, endpoint: Endpoint, params: dict[str, Any], rate: RateStatus) -> web.Response:
        try:
            return json_response(endpoint.handler(self.api, params), 200, rate)
        except BitvavoError as error:
            return error_response(error, rate)
        except Exception:  # a simulator bug must still answer like the exchange: 101, never HTML
            log.exception("unhandled error in %s %s", endpoint.method, endpoint.template)
            return error_response(api_error(101), rate)

    async def _inject(self, request: web.Request, fault: RestFault, endpoint: Endpoint,
                      params: dict[str, Any], rate: RateStatus) -> web.StreamResponse:
        if fault.kind == "delay":  # answered as usual, the answer held back on its way: a slow round trip
            response = self._run(endpoint, params, rate)
            await asyncio.sleep(fault.hang_seconds)
            return response
        if fault.execute:
            self._run(endpoint, params, rate)
        if fault.kind == "error":
            return error_response(api_error(fault.error_code), rate)
        # Hang past the client's timeout, then drop the connection without an answer.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(fault.hang_seconds):
                await self.shutdown.wait()
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=504)


def _parse_body(raw: bytes) -> tuple[Any, bool]:
    if not raw.strip():
        return None, True
    try:
        return orjson.loads(raw), True
    except orjson.JSONDecodeError:
        return None, False


def _signed_forms(raw: bytes, body: Any, body_ok: bool) -> list[str]:
    """What the client may have signed: the compact body ('' for {} or none), or the raw text."""
    forms = []
    if body_ok and (body is None or isinstance(body, dict)):
        forms.append(compact_body(body))
    text = raw.decode("utf-8", errors="replace")
    if text not in forms:
        forms.append(text)
    return forms
