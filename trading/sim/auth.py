"""Request authentication as the exchange does it (spec §1.3), checks in the server's order.

The signed string is timestamp + METHOD + path-with-query exactly as sent + body. The official
SDK signs the compact JSON of its body but transmits spaced JSON (and `{}` on GET/DELETE while
signing nothing), so the body is accepted in any of its candidate forms: the compact
re-serialisation of the parsed body ('' for an empty object) or the raw text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from trading.exchange.errors import AuthenticationError, BitvavoError, error_body
from trading.exchange.signing import signature, signatures_equal

DEFAULT_WINDOW_MS = 10_000
MIN_WINDOW_MS = 100
MAX_WINDOW_MS = 60_000
KEY_LENGTH = 64
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")

# What an API key may do: 'view' (account/order reads) and 'trade' (create/update/cancel).
ALL_PERMISSIONS = frozenset({"view", "trade", "withdraw"})
# A key made for trading has no withdrawal right, like the keys production should use.
DEFAULT_PERMISSIONS = frozenset({"view", "trade"})
KEY_STATES = ("active", "unconfirmed", "ipBlocked")


@dataclass
class ApiKey:
    key: str
    secret: str
    state: str = "active"  # unconfirmed -> 306, ipBlocked -> 307 (settable through the control API)
    permissions: frozenset[str] = field(default=DEFAULT_PERMISSIONS)


def auth_error(code: int) -> BitvavoError:
    return AuthenticationError(code, error_body(code)["error"], 403)


def _int_field(value: Any) -> int | None:
    """An integer given as a JSON integer or a digit string; None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


def verify(api_key: ApiKey, *, key: Any, timestamp: Any, sig: Any, window: Any, method: str,
           path_with_query: str, bodies: Iterable[str], now_ms: int) -> None:
    """Raise the 30x error of the first failing check; return when the request is authentic."""
    if key is None:
        raise auth_error(300)
    if not isinstance(key, str) or len(key) != KEY_LENGTH:
        raise auth_error(301)
    if key != api_key.key:
        raise auth_error(305)
    if api_key.state == "unconfirmed":
        raise auth_error(306)
    if api_key.state == "ipBlocked":
        raise auth_error(307)
    ts = _int_field(timestamp)
    if ts is None:
        raise auth_error(302)
    window_ms = DEFAULT_WINDOW_MS if window is None else _int_field(window)
    if window_ms is None or not MIN_WINDOW_MS <= window_ms <= MAX_WINDOW_MS:
        raise auth_error(303)
    # The docs only define the late side; a clock running ahead gets the same window.
    if abs(now_ms - ts) > window_ms:
        raise auth_error(304)
    if not isinstance(sig, str) or not _HEX64.match(sig):
        raise auth_error(308)
    for body in bodies:
        expected = signature(api_key.secret, timestamp, method, path_with_query, body)
        if signatures_equal(expected, sig):
            return
    raise auth_error(309)


def check_permission(api_key: ApiKey, needed: str | None) -> None:
    if needed is None or needed in api_key.permissions:
        return
    raise auth_error({"trade": 310, "withdraw": 312}.get(needed, 311))
