"""Request signing (spec §1.2): HMAC-SHA256 over timestamp + METHOD + /v2path[?query] + body."""

import hashlib
import hmac
import json
from typing import Any

WEBSOCKET_SIGN_PATH = "/v2/websocket"


def compact_body(body: dict[str, Any] | None) -> str:
    """The body as Bitvavo signs it: compact JSON, key order preserved, '' for empty/None.

    stdlib json (ensure_ascii) on purpose: it is byte-for-byte what the official SDK signs.
    """
    if not body:
        return ""
    return json.dumps(body, separators=(",", ":"))


def signature(secret: str, timestamp_ms: int | str, method: str, path_with_query: str, body: str = "") -> str:
    """Lowercase hex HMAC-SHA256. `path_with_query` starts with /v2 (e.g. '/v2/order?market=BTC-EUR')."""
    payload = f"{timestamp_ms}{method.upper()}{path_with_query}{body}"
    return hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()


def websocket_signature(secret: str, timestamp_ms: int | str) -> str:
    return signature(secret, timestamp_ms, "GET", WEBSOCKET_SIGN_PATH)


def signatures_equal(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.lower().encode())
