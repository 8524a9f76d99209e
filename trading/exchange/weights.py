"""Rate-limit weights per REST endpoint and WebSocket action (spec §2, §4).

The budget is 1000 weight points per minute, per API key (signed) or per IP (unsigned).
"""

from collections.abc import Mapping
from typing import Any

RATE_LIMIT_PER_MINUTE = 1000

# (METHOD, path template) -> (weight with a market filter, weight without)
_REST: dict[tuple[str, str], tuple[int, int]] = {
    ("GET", "/time"): (1, 1),
    ("GET", "/markets"): (1, 1),
    ("GET", "/assets"): (1, 1),
    ("GET", "/{market}/book"): (1, 1),
    ("GET", "/{market}/trades"): (5, 5),
    ("GET", "/{market}/candles"): (1, 1),
    ("GET", "/ticker/price"): (1, 1),
    ("GET", "/ticker/book"): (1, 1),
    ("GET", "/ticker/24h"): (1, 25),
    ("POST", "/order"): (1, 1),
    ("GET", "/order"): (1, 1),
    ("PUT", "/order"): (1, 1),
    ("DELETE", "/order"): (1, 1),
    ("GET", "/orders"): (5, 5),
    ("DELETE", "/orders"): (1, 1),
    ("GET", "/ordersOpen"): (1, 25),
    ("GET", "/trades"): (5, 5),
    ("GET", "/account"): (1, 1),
    ("GET", "/account/fees"): (1, 1),
    ("GET", "/balance"): (5, 5),
    ("POST", "/cancelOrdersAfter"): (5, 5),
}

# WebSocket action -> REST endpoint it mirrors (same weight).
WS_ACTION_ENDPOINT: dict[str, tuple[str, str]] = {
    "getTime": ("GET", "/time"),
    "getMarkets": ("GET", "/markets"),
    "getAssets": ("GET", "/assets"),
    "getBook": ("GET", "/{market}/book"),
    "getTrades": ("GET", "/{market}/trades"),
    "getCandles": ("GET", "/{market}/candles"),
    "getTickerPrice": ("GET", "/ticker/price"),
    "getTickerBook": ("GET", "/ticker/book"),
    "getTicker24h": ("GET", "/ticker/24h"),
    "privateCreateOrder": ("POST", "/order"),
    "privateGetOrder": ("GET", "/order"),
    "privateUpdateOrder": ("PUT", "/order"),
    "privateCancelOrder": ("DELETE", "/order"),
    "privateGetOrders": ("GET", "/orders"),
    "privateCancelOrders": ("DELETE", "/orders"),
    "privateGetOrdersOpen": ("GET", "/ordersOpen"),
    "privateGetTrades": ("GET", "/trades"),
    "privateGetAccount": ("GET", "/account"),
    "privateGetFees": ("GET", "/account/fees"),
    "privateGetBalance": ("GET", "/balance"),
    "privateCancelOrdersAfter": ("POST", "/cancelOrdersAfter"),
}


def _filtered(params: Mapping[str, Any] | None) -> bool:
    return bool(params) and any(params.get(k) for k in ("market", "base"))  # type: ignore[union-attr]


def rest_weight(method: str, template: str, params: Mapping[str, Any] | None = None) -> int:
    """Weight of one REST call. Unknown endpoints cost 1 (what Bitvavo charges for errors)."""
    with_market, without = _REST.get((method.upper(), template), (1, 1))
    return with_market if _filtered(params) else without


def ws_action_weight(action: str, params: Mapping[str, Any] | None = None) -> int:
    """Weight of one WebSocket action; subscribe/unsubscribe/authenticate cost 1."""
    endpoint = WS_ACTION_ENDPOINT.get(action)
    if endpoint is None:
        return 1
    return rest_weight(endpoint[0], endpoint[1], params)


def rest_template(path: str) -> str:
    """Map a concrete path ('/BTC-EUR/book') to its template ('/{market}/book')."""
    parts = path.strip("/").split("/")
    if len(parts) == 2 and parts[1] in ("book", "trades", "candles") and "-" in parts[0]:
        return "/{market}/" + parts[1]
    return path if path.startswith("/") else "/" + path
