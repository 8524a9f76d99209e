"""Bitvavo REST client: the official SDK's endpoint surface over a transport we control.

The SDK (python-bitvavo-api 1.4.3) knows every endpoint, but its transport hides status codes
and rate-limit headers, sends a body that differs from what it signs, calls `r.json()` on HTML
error pages and mis-tracks bans (spec §8). `_GovernedSdk` keeps the SDK's endpoint methods and
replaces `publicRequest`/`privateRequest`, so every call here:
- books its weight in the shared `RateGovernor` first, and feeds the response headers back;
- sends exactly the compact body it signed;
- maps error JSON to typed exceptions carrying `error_code`;
- retries only GETs (safe to repeat) on transport errors, 5xx and "not processed" codes.

Order calls always carry `operatorId` and a UUID `clientOrderId`. A timeout or 5xx on an order
call raises `OutcomeUncertainError`: look the order up by clientOrderId, never resend blindly.

The clock offset used for signing is measured by `sync_clock` (the rule is in `clock_sync.py`);
once measured, again every `CLOCK_RESYNC_S` before a signed call, and after a 304 ("not received within the
access window"): a 304 means the request was not executed, so the call is retried once after
re-measuring, and a 304 never outlives the next good measurement.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

import requests
from pydantic import SecretStr
from python_bitvavo_api.bitvavo import Bitvavo, createPostfix

from trading.clock import now_ms
from trading.decimals import format_decimal
from trading.exchange.clock_sync import (
    CLOCK_GOOD_SAMPLES,
    CLOCK_MAX_RTT_MS,
    CLOCK_RESYNC_S,
    CLOCK_SAMPLE_TIMEOUT_S,
    CLOCK_SAMPLES,
    ClockSample,
    ClockSyncError,
    best_sample,
)
from trading.exchange.errors import (
    BitvavoError,
    ExchangeUnavailableError,
    OutcomeUncertainError,
    RateLimitBannedError,
    error_from_payload,
)
from trading.exchange.governor import RateGovernor, budget_identity, shared_governor
from trading.exchange.models import BookSnapshot, Candle, Order, PayloadError
from trading.exchange.signing import compact_body, signature
from trading.exchange.weights import rest_template, rest_weight

log = logging.getLogger(__name__)

JsonBody = dict[str, Any] | list[Any]
_NOT_IN_ACCESS_WINDOW = 304
_TRANSIENT_CODES = frozenset({101, 107, 108, 109, 111})
_CRITICAL_PATHS = frozenset({("DELETE", "/order"), ("DELETE", "/orders")})


def _header_int(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    return int(value) if value is not None and value.lstrip("-").isdigit() else None


def new_client_order_id() -> str:
    return str(uuid.uuid4())


def _check_uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"clientOrderId must be a UUID, got {value!r}") from None


@contextmanager
def _uncertain_about(market: str, client_order_id: str) -> Iterator[None]:
    """Tag an uncertain outcome with the order's identity, so the caller can look it up."""
    try:
        yield
    except OutcomeUncertainError as exc:
        exc.market, exc.client_order_id = market, client_order_id
        raise
    except PayloadError as exc:
        # The exchange answered 2xx but with a reply we cannot read: the order may well exist.
        error = OutcomeUncertainError(101, f"order reply did not parse: {exc}")
        error.market, error.client_order_id = market, client_order_id
        raise error from exc


def _order_fields(**fields: Decimal | str | bool | None) -> dict[str, Any]:
    """Body fields that are set, decimals as Bitvavo's minimal strings."""
    return {key: format_decimal(value) if isinstance(value, Decimal) else value
            for key, value in fields.items() if value is not None}


class _GovernedSdk(Bitvavo):  # type: ignore[misc]
    """The SDK with our transport (see module doc)."""

    def __init__(self, owner: BitvavoRest, options: dict[str, Any]) -> None:
        super().__init__(options)
        self._owner = owner

    def publicRequest(self, url: str) -> Any:  # SDK method name
        return self._owner.request("GET", url.replace(self.base, "", 1), None)

    def privateRequest(self, endpoint: str, postfix: str, body: dict[str, Any] | None = None,
                       method: str = "GET") -> Any:
        return self._owner.request(method, endpoint + postfix, body, private=True)


class BitvavoRest:
    def __init__(self, rest_url: str, *, api_key: SecretStr | None = None, api_secret: SecretStr | None = None,
                 operator_id: int | None = None, governor: RateGovernor | None = None, timeout_s: float = 10.0,
                 access_window_ms: int = 10_000, max_retries: int = 3, retry_base_s: float = 0.25) -> None:
        self.rest_url = rest_url.rstrip("/")
        self._api_key = api_key
        self._api_secret = api_secret
        self.operator_id = operator_id
        self.governor = governor or shared_governor(budget_identity(self.rest_url, api_key))
        self.timeout_s = timeout_s
        self.access_window_ms = access_window_ms
        self.max_retries = max_retries
        self.retry_base_s = retry_base_s
        self.clock_offset_ms = 0
        self.clock_rtt_ms: int | None = None  # round trip of the sample the offset came from; None: never measured
        self._clock_measured_at: float | None = None  # time.monotonic()
        self._path_prefix = urlsplit(self.rest_url).path  # "/v2"
        self._session = requests.Session()
        self.sdk = _GovernedSdk(self, {"RESTURL": self.rest_url, "ACCESSWINDOW": access_window_ms})

    def __repr__(self) -> str:
        return f"BitvavoRest({self.rest_url!r}, signed={self._api_key is not None})"

    def close(self) -> None:
        self._session.close()

    # transport ---------------------------------------------------------------------------------

    def request(self, method: str, path_with_query: str, body: dict[str, Any] | None, *,
                private: bool = False) -> Any:
        method = method.upper()
        split = urlsplit(path_with_query)
        params: dict[str, Any] = dict(parse_qsl(split.query)) if split.query else dict(body or {})
        template = rest_template(split.path)
        weight = rest_weight(method, template, params)
        critical = (method, template) in _CRITICAL_PATHS
        if private and self._api_key is None:
            raise BitvavoError(300, "Authentication is required for this endpoint (no API key configured).")
        if private and self._clock_due():
            self._resync_quietly("due")
        attempt = 0
        resynced = False
        while True:
            self.governor.acquire(weight, critical=critical)
            try:
                return self._send_once(method, path_with_query, body if method in ("POST", "PUT") else None)
            except (OutcomeUncertainError, ExchangeUnavailableError):
                if method != "GET" or attempt >= self.max_retries:
                    raise
            except BitvavoError as exc:
                # 304: not executed (outside the access window), so even an order may be sent again, once,
                # with a freshly measured offset.
                if exc.error_code != _NOT_IN_ACCESS_WINDOW or resynced or not self._resync_quietly("304"):
                    raise
                resynced = True
                continue
            attempt += 1
            time.sleep(min(self.retry_base_s * 2 ** (attempt - 1), 5.0) * (0.5 + random.random()))

    def _send_once(self, method: str, path_with_query: str, body: dict[str, Any] | None, *,
                   timeout_s: float | None = None, signed: bool = True) -> Any:
        payload = compact_body(body)
        headers = {"Content-Type": "application/json"} if payload else {}
        if signed and self._api_key is not None and self._api_secret is not None:
            timestamp = now_ms() + self.clock_offset_ms
            headers.update({
                "Bitvavo-Access-Key": self._api_key.get_secret_value(),
                "Bitvavo-Access-Timestamp": str(timestamp),
                "Bitvavo-Access-Signature": signature(self._api_secret.get_secret_value(), timestamp, method,
                                                      self._path_prefix + path_with_query, payload),
                "Bitvavo-Access-Window": str(self.access_window_ms),
            })
        url = self.rest_url + path_with_query
        try:
            response = self._session.request(method, url, data=payload.encode() if payload else None,
                                             headers=headers, timeout=timeout_s or self.timeout_s)
        except requests.Timeout:
            raise OutcomeUncertainError(109, f"{method} {path_with_query} timed out after "
                                             f"{timeout_s or self.timeout_s}s") from None
        except requests.RequestException as exc:
            # Connection refused or reset, a reply cut off mid-body...: the request may have been executed.
            raise OutcomeUncertainError(101, f"{method} {path_with_query}: {type(exc).__name__}: {exc}") from None
        self.governor.observe_headers(_header_int(response.headers, "bitvavo-ratelimit-remaining"),
                                      _header_int(response.headers, "bitvavo-ratelimit-resetat"))
        try:
            data = response.json()
        except ValueError:
            data = None
        if isinstance(data, dict) and "errorCode" in data:
            error = error_from_payload(data, response.status_code)
            if isinstance(error, RateLimitBannedError):
                self.governor.observe_ban(error.banned_until_ms)
            raise error
        if response.status_code >= 500 or (data is None and method != "GET" and response.status_code < 400):
            raise OutcomeUncertainError(101, f"HTTP {response.status_code} from {method} {path_with_query}"
                                        + ("" if data is not None else " with a non-JSON body"), response.status_code)
        if data is None or response.status_code >= 400:
            raise BitvavoError(110, f"HTTP {response.status_code} non-JSON reply from {method} {path_with_query}",
                               response.status_code)
        return data

    # public ------------------------------------------------------------------------------------

    def sync_clock(self, *, samples: int = CLOCK_SAMPLES, max_rtt_ms: int = CLOCK_MAX_RTT_MS) -> int:
        """Measure the offset to the exchange clock (used for signing) from up to `samples` `/time`
        calls, each sent once (no retry), keeping the fastest within `max_rtt_ms`; returns it in ms.

        `ClockSyncError` when no sample qualifies: the previous offset stays.
        """
        taken: list[ClockSample] = []
        failures: list[str] = []
        for _ in range(samples):
            self.governor.acquire(rest_weight("GET", "/time", {}))
            sent = now_ms()
            try:
                # Unsigned: a signature made with the offset being replaced could itself be refused (304).
                reply = self._send_once("GET", "/time", None, timeout_s=min(self.timeout_s, CLOCK_SAMPLE_TIMEOUT_S),
                                        signed=False)
                received = now_ms()
                server = reply["time"]
                if not isinstance(server, int) or isinstance(server, bool):
                    raise PayloadError(f"/time: 'time' is not an integer: {server!r}")
            except (BitvavoError, PayloadError, KeyError, TypeError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            taken.append(ClockSample(sent, received, server))
            if sum(1 for s in taken if s.rtt_ms <= max_rtt_ms) >= CLOCK_GOOD_SAMPLES:
                break
        best = best_sample(taken, max_rtt_ms)
        if best is None:
            slowest = ", ".join(f"{s.rtt_ms} ms" for s in taken) or "none answered"
            raise ClockSyncError(111, f"clock sync: no /time sample within {max_rtt_ms} ms round trip "
                                      f"(round trips: {slowest}; errors: {'; '.join(failures[:3]) or 'none'}); "
                                      f"keeping offset {self.clock_offset_ms} ms")
        self.clock_offset_ms = best.offset_ms
        self.clock_rtt_ms = best.rtt_ms
        self._clock_measured_at = time.monotonic()
        return self.clock_offset_ms

    def _clock_due(self) -> bool:
        # Only a client that measured once keeps measuring: the others sign with our own clock (offset 0).
        return self._clock_measured_at is not None and time.monotonic() - self._clock_measured_at >= CLOCK_RESYNC_S

    def _resync_quietly(self, why: str) -> bool:
        """Re-measure the offset; a failure is logged and the old offset kept. True when measured."""
        before = self.clock_offset_ms
        try:
            self.sync_clock()
        except ClockSyncError as exc:
            self._clock_measured_at = time.monotonic()  # not again on every call: the next try is a period away
            log.warning("exchange clock re-measure (%s) failed: %s", why, exc)
            return False
        if abs(self.clock_offset_ms - before) > 100 or why == "304":
            log.info("exchange clock re-measured (%s): offset %d ms (was %d ms, round trip %s ms)", why,
                     self.clock_offset_ms, before, self.clock_rtt_ms)
        return True

    def time(self) -> dict[str, int]:
        return cast(dict[str, int], self.sdk.time())

    def markets(self, market: str | None = None) -> Any:
        return self.sdk.markets({"market": market} if market else None)

    def assets(self, symbol: str | None = None) -> Any:
        return self.sdk.assets({"symbol": symbol} if symbol else None)

    def book(self, market: str, depth: int | None = None) -> BookSnapshot:
        return BookSnapshot.from_wire(self.sdk.book(market, {"depth": depth} if depth else None))

    def public_trades(self, market: str, **options: Any) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.sdk.publicTrades(market, options or None))

    def candles(self, market: str, interval: str, *, limit: int | None = None, start_ms: int | None = None,
                end_ms: int | None = None) -> list[Candle]:
        options = {k: v for k, v in (("limit", limit), ("start", start_ms), ("end", end_ms)) if v is not None}
        rows = self.sdk.candles(market, interval, options)
        return [Candle.from_wire(row) for row in rows]

    def ticker_price(self, market: str | None = None) -> Any:
        return self.sdk.tickerPrice({"market": market} if market else None)

    def ticker_book(self, market: str | None = None) -> Any:
        return self.sdk.tickerBook({"market": market} if market else None)

    def ticker24h(self, market: str | None = None) -> Any:
        return self.sdk.ticker24h({"market": market} if market else None)

    # private -----------------------------------------------------------------------------------

    def _operator(self) -> int:
        if self.operator_id is None:
            raise ValueError("operatorId is mandatory on Bitvavo order calls: set BITVAVO_OPERATOR_ID")
        return self.operator_id

    def place_order(self, market: str, side: str, order_type: str, *, amount: Decimal | None = None,
                    amount_quote: Decimal | None = None, price: Decimal | None = None,
                    time_in_force: str | None = None, post_only: bool | None = None,
                    client_order_id: str | None = None) -> Order:
        body = _order_fields(amount=amount, amountQuote=amount_quote, price=price, timeInForce=time_in_force,
                             postOnly=post_only)
        order_id = _check_uuid(client_order_id) if client_order_id else new_client_order_id()
        body["clientOrderId"] = order_id
        body["operatorId"] = self._operator()
        with _uncertain_about(market, order_id):
            return Order.from_wire(self.sdk.placeOrder(market, side, order_type, body))

    def get_order(self, market: str, *, order_id: str | None = None, client_order_id: str | None = None) -> Order:
        # The SDK's getOrder has no clientOrderId; the lookup after an uncertain submit needs it.
        ident = {"orderId": order_id} if order_id else {"clientOrderId": _check_uuid(client_order_id or "")}
        return Order.from_wire(self.request("GET", "/order" + createPostfix({"market": market, **ident}), None,
                                            private=True))

    def update_order(self, market: str, *, order_id: str | None = None, client_order_id: str | None = None,
                     amount: Decimal | None = None, amount_remaining: Decimal | None = None,
                     price: Decimal | None = None, time_in_force: str | None = None,
                     post_only: bool | None = None) -> Order:
        body: dict[str, Any] = {"market": market}
        body.update({"orderId": order_id} if order_id else {"clientOrderId": _check_uuid(client_order_id or "")})
        body.update(_order_fields(amount=amount, amountRemaining=amount_remaining, price=price,
                                  timeInForce=time_in_force, postOnly=post_only))
        body["operatorId"] = self._operator()
        return Order.from_wire(self.request("PUT", "/order", body, private=True))

    def cancel_order(self, market: str, *, order_id: str | None = None,
                     client_order_id: str | None = None) -> dict[str, Any]:
        ident = {"orderId": order_id} if order_id else {"clientOrderId": _check_uuid(client_order_id or "")}
        postfix = createPostfix({"market": market, **ident, "operatorId": self._operator()})
        return cast(dict[str, Any], self.request("DELETE", "/order" + postfix, None, private=True))

    def cancel_orders(self, market: str | None = None) -> list[dict[str, Any]]:
        options: dict[str, Any] = {"market": market} if market else {}
        options["operatorId"] = self._operator()
        return cast(list[dict[str, Any]], self.sdk.cancelOrders(options))

    def orders(self, market: str, **options: Any) -> list[Order]:
        return [Order.from_wire(o) for o in self.sdk.getOrders(market, options or None)]

    def open_orders(self, market: str | None = None) -> list[Order]:
        return [Order.from_wire(o) for o in self.sdk.ordersOpen({"market": market} if market else None)]

    def trades(self, market: str, **options: Any) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.sdk.trades(market, options or None))

    def balance(self, symbol: str | None = None) -> list[dict[str, Any]]:
        result = self.sdk.balance({"symbol": symbol} if symbol else None)
        return [result] if isinstance(result, dict) else cast(list[dict[str, Any]], result)

    def account(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.sdk.account())

    def fees(self, market: str | None = None) -> dict[str, Any]:
        return cast(dict[str, Any], self.sdk.fees(market))

    def key_can_withdraw(self) -> bool:
        """Whether this API key may withdraw funds, asked without moving any.

        Bitvavo checks a key's permission (error 312) before it reads the request, so a withdrawal
        of amount 0 to an empty address is answered 312 by a key without the right and with a
        parameter error by a key that has it; neither can transfer anything.
        """
        try:
            self.request("POST", "/withdrawal", {"symbol": "EUR", "amount": "0", "address": ""}, private=True)
        except BitvavoError as exc:
            if exc.error_code == 312:
                return False
            if exc.error_code in (300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 311):
                raise  # the key itself is not usable: say so rather than guess
            return True
        return True
