"""`trading:events` (design §4): what the core, the executor and the ops flows decided, and why.

One entry per decision (a guard's verdict, a kill-switch block, a reconcile mismatch, an
operator action), so the stream is the audit trail next to the flow-run history. Queued on
the caller's Redis transaction, so an event exists exactly when the effect it explains does.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from trading.bus import EVENT_SCHEMA, TRADING_EVENTS, decode_entry, encode_entry
from trading.clock import now_ms

EVENTS_MAXLEN = 100_000


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


def event_fields(event_type: str, severity: Severity, *, market: str | None = None, intent_id: str | None = None,
                 detail: dict[str, Any] | None = None, ts: int | None = None) -> dict[str, str]:
    """An encoded `trading:events` entry; `detail` is JSON (decimals as strings)."""
    return encode_entry({"ts": now_ms() if ts is None else ts, "type": event_type, "severity": severity,
                         "market": market, "intent_id": intent_id, "detail": detail or {}})


def queue_event(tx: Any, event_type: str, severity: Severity, **kwargs: Any) -> None:
    """Append an event to a pipeline/transaction (its XADD runs with the caller's other writes)."""
    tx.xadd(TRADING_EVENTS, event_fields(event_type, severity, **kwargs), maxlen=EVENTS_MAXLEN, approximate=True)


async def read_events(client: Any, *, count: int = 1000) -> list[dict[str, Any]]:
    """The newest `count` events, oldest first, decoded (tests, preflight, ops flows)."""
    raw = await client.xrevrange(TRADING_EVENTS, count=count)
    return [decode_entry(fields, EVENT_SCHEMA) for _id, fields in reversed(raw)]
