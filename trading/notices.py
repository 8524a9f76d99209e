"""Notices: the few `trading:events` an operator must hear about, relayed to whoever delivers messages.

`trading:events` is the audit stream: every guard verdict, order and operator action, thousands an
hour. A handful of them need a person: `NoticeRules.notice_for(event)` picks those and words them
(what happened, where, what to do), and returns None for everything else:

| event                                        | notice (`kind`)     | at most                              |
|----------------------------------------------|---------------------|--------------------------------------|
| `kill_switch` by an operator (on or off)     | `kill-switch`       | every one                            |
| `flatten`                                    | `flatten`           | every one                            |
| `go_live_decision` by an operator            | `go-live`           | every one                            |
| `go_live_decision` NO-GO by the preflight    | `preflight-no-go`   | once per 6 h (it runs hourly)        |
| `reject` by the `daily_loss` guard           | `daily-loss`        | once per UTC day                     |
| `dead_letter` (any consumer)                 | `dead-letter`       | once per stream per 15 min           |
| `intent_refused_by_executor`                 | `executor-refused`  | once per market and rule per 15 min  |
| `ledger_anomaly`, `order_lost`               | same, hyphenated    | every one                            |

Everything else is noise here: routine guard rejects (cooldown, spread, stale data...), the
trading core's refusals while the kill switch is on (the switch itself was the notice), orders,
fills. A crashed or failed loop is Prefect's own event (`prefect.flow-run.Crashed`), matched by
its own automation (deployments/automations.py).

`NoticeRelay` is the group `notices` on `trading:events`, run by the ops-metrics loop: it hands each
notice to `publish` (the flow turns it into a Prefect event, `trading.notice.<kind>`, which the
notification automations match) before the entry is acknowledged, so a notice is delivered at
least once; a relay restarted within a quiet window may repeat one. The group starts at the
stream's end: a first start does not replay history. docs/runbooks.md, "Notifications".
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis.asyncio
from prometheus_client import CollectorRegistry, Counter
from redis.asyncio.client import Pipeline

from trading.bus import EVENT_SCHEMA, TRADING_EVENTS, decode_entry
from trading.consumer import ConsumerMetrics, GroupConsumer, RejectEntry, StreamEntry
from trading.metrics import LabelCache

log = logging.getLogger(__name__)

GROUP = "notices"
QUIET_MS = 15 * 60_000
NO_GO_QUIET_MS = 6 * 3_600_000  # the preflight runs hourly: a NO-GO that persists is said every 6 hours
DAY_MS = 24 * 3_600_000
RUNBOOK = "docs/runbooks.md"
EVENT_PREFIX = "trading.notice."


@dataclass(frozen=True)
class Notice:
    """One message for a person: `subject` says what happened, `body` where and what to do."""

    kind: str
    severity: str
    subject: str
    body: str
    loop: str  # the deployment (loop or operator flow) that recorded the event
    runbook: str  # `docs/runbooks.md#<section>`
    market: str | None = None
    ts: int = 0  # the event's time, UTC ms

    @property
    def event(self) -> str:
        """The Prefect event name the notification automations match."""
        return EVENT_PREFIX + self.kind

    @property
    def resource_id(self) -> str:
        return f"trading.market.{self.market}" if self.market else "trading.stack"

    def payload(self) -> dict[str, Any]:
        return {"kind": self.kind, "severity": self.severity, "subject": self.subject, "body": self.body,
                "loop": self.loop, "market": self.market, "runbook": self.runbook, "ts": self.ts}


_GROUP_DEPLOYMENTS = {"pnl": "pnl-orchestrator", GROUP: "ops-metrics"}  # consumer group -> its deployment

Throttle = tuple[str, int]  # a key and its quiet window (ms): one notice per key per window of event time
Rule = Callable[[Mapping[str, Any]], "tuple[Notice, Throttle | None] | None"]


def _when(ts: int) -> str:
    return datetime.fromtimestamp(ts / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _runbook(section: str) -> str:
    return f"{RUNBOOK}#{section}"


def _detail(event: Mapping[str, Any]) -> Mapping[str, Any]:
    detail = event.get("detail")
    return detail if isinstance(detail, Mapping) else {}


def _kill_switch(event: Mapping[str, Any]) -> tuple[Notice, Throttle | None] | None:
    detail = _detail(event)
    if "enabled" not in detail:  # the trading core refusing a signal while the switch is on
        return None
    on = bool(detail["enabled"])
    state = "ON: no new orders" if on else "OFF: trading may resume"
    todo = ("Open orders stay open: flatten if positions must go." if on
            else "Check the trading core's next decisions in trading:events.")
    return Notice("kill-switch", str(event.get("severity") or "critical"), f"Kill switch {state}",
                  f"{detail.get('operator', '?')} switched the kill switch {'on' if on else 'off'} at "
                  f"{_when(int(event['ts']))}: {detail.get('reason', '')}. {todo} "
                  f"Runbook: {_runbook('kill-switch-and-flatten')}", "kill-switch",
                  _runbook("kill-switch-and-flatten"), ts=int(event["ts"])), None


def _flatten(event: Mapping[str, Any]) -> tuple[Notice, Throttle | None] | None:
    detail = _detail(event)
    return Notice("flatten", "critical", f"Flatten by {detail.get('operator', '?')}",
                  f"{detail.get('summary', '')} (reason: {detail.get('reason', '')}; positions closed: "
                  f"{detail.get('close_positions')}). The flatten artifact of the run lists each order. "
                  f"Runbook: {_runbook('kill-switch-and-flatten')}", "flatten",
                  _runbook("kill-switch-and-flatten"), ts=int(event["ts"])), None


def _go_live_decision(event: Mapping[str, Any]) -> tuple[Notice, Throttle | None] | None:
    detail = _detail(event)
    decision, operator = str(detail.get("decision")), str(detail.get("operator", "?"))
    if operator == "preflight":  # hourly checks: one NO-GO message per quiet window, not one per check
        return Notice("preflight-no-go", "critical", "Preflight NO-GO: the live gate is closed",
                      f"The preflight checklist failed at {_when(int(event['ts']))}: {detail.get('reason', '')}. "
                      f"Live intents are refused until a go-live decision after a GO preflight. The "
                      f"preflight-checklist artifact shows each check. Runbook: {_runbook('going-live')}",
                      "preflight", _runbook("going-live"), ts=int(event["ts"])), ("preflight-no-go", NO_GO_QUIET_MS)
    until = detail.get("valid_until_ms")
    valid = f", valid until {_when(int(until))}" if until else ""
    return Notice("go-live", "warning", f"Go-live decision: {decision} by {operator}",
                  f"{operator} recorded {decision}{valid}: {detail.get('reason', '')}. The decision record is in "
                  f"the lake's decisions/ folder and the go-live run's artifacts. Runbook: {_runbook('going-live')}",
                  "go-live", _runbook("going-live"), ts=int(event["ts"])), None


def _daily_loss(event: Mapping[str, Any]) -> tuple[Notice, Throttle | None] | None:
    detail = _detail(event)
    if detail.get("guard") != "daily_loss":
        return None  # every other guard's reject is routine
    day = datetime.fromtimestamp(int(event["ts"]) / 1000, UTC).date().isoformat()
    return Notice("daily-loss", "critical", f"Daily-loss limit reached ({day})",
                  f"The daily_loss guard refused a new {event.get('market')} intent at {_when(int(event['ts']))}: "
                  f"{detail.get('reason', '')} (realised today {detail.get('measured')}, floor "
                  f"{detail.get('limit')}). No new risk until 00:00 UTC; sells that reduce a position still "
                  f"pass. Runbook: {_runbook('daily-loss-limit')}", "trading-core",
                  _runbook("daily-loss-limit"), market=event.get("market"), ts=int(event["ts"])), \
        (f"daily-loss:{day}", DAY_MS)


def _dead_letter(event: Mapping[str, Any]) -> tuple[Notice, Throttle | None] | None:
    detail = _detail(event)
    stream, group = str(detail.get("stream", "?")), str(detail.get("group", "?"))
    return Notice("dead-letter", "warning", f"Entries dead-lettered on {stream}",
                  f"Group {group} moved entry {detail.get('source_id', '?')} of {stream} to "
                  f"{stream}:dead ({detail.get('cause', '?')}): {detail.get('reason', '')}. Further ones on "
                  f"{stream} within {QUIET_MS // 60_000} min are not announced; the loop's *_dead_letters_total "
                  f"metric counts them all. Runbook: {_runbook('dead-letters')}", _GROUP_DEPLOYMENTS.get(group, group),
                  _runbook("dead-letters"), ts=int(event["ts"])), (f"dead-letter:{stream}", QUIET_MS)


def _executor_refused(event: Mapping[str, Any]) -> tuple[Notice, Throttle | None] | None:
    detail = _detail(event)
    market, rule = event.get("market"), detail.get("rule", "?")
    return Notice("executor-refused", "critical", f"Executor refused an intent for {market} ({rule})",
                  f"Intent {event.get('intent_id')} broke the executor's {rule} check: {detail.get('reason', '')}. "
                  f"Something wrote past the trading core's guards: stop and find the writer. "
                  f"Runbook: {_runbook('executor-refusals')}", "executor", _runbook("executor-refusals"),
                  market=market, ts=int(event["ts"])), (f"executor-refused:{market}:{rule}", QUIET_MS)


def _ledger_anomaly(event: Mapping[str, Any]) -> tuple[Notice, Throttle | None] | None:
    detail = _detail(event)
    return Notice("ledger-anomaly", "critical", f"Ledger anomaly on {event.get('market')} ({detail.get('mode')})",
                  f"{detail.get('reason', '')} (intent {event.get('intent_id')}). Runbook: "
                  f"{_runbook('ledger-anomaly')}", "pnl-orchestrator", _runbook("ledger-anomaly"),
                  market=event.get("market"), ts=int(event["ts"])), None


def _order_lost(event: Mapping[str, Any]) -> tuple[Notice, Throttle | None] | None:
    detail = _detail(event)
    return Notice("order-lost", "critical", f"Order lost (intent {event.get('intent_id')})",
                  f"{detail.get('reason', '')}. Compare the exchange's order history with orders:executed. "
                  f"Runbook: {_runbook('dead-letters')}", "executor", _runbook("dead-letters"),
                  market=event.get("market"), ts=int(event["ts"])), None


RULES: Mapping[str, Rule] = {
    "kill_switch": _kill_switch, "flatten": _flatten, "go_live_decision": _go_live_decision,
    "reject": _daily_loss, "dead_letter": _dead_letter, "intent_refused_by_executor": _executor_refused,
    "ledger_anomaly": _ledger_anomaly, "order_lost": _order_lost,
}


@dataclass
class NoticeRules:
    """Which events become notices; a throttled one at most once per key and window of event time."""

    _last: dict[str, int] = field(default_factory=dict)
    suppressed: int = 0

    def notice_for(self, event: Mapping[str, Any]) -> Notice | None:
        rule = RULES.get(str(event.get("type")))
        made = rule(event) if rule is not None else None
        if made is None:
            return None
        notice, throttle = made
        if throttle is not None:
            key, window_ms = throttle
            last = self._last.get(key)
            if last is not None and notice.ts - last < window_ms:
                self.suppressed += 1
                return None
            self._last[key] = notice.ts
        return notice


Publish = Callable[[Notice], Awaitable[None]]


class NoticeMetrics:
    """`trading_ops_notices_total{kind}` and the relay's consumer metrics (`trading_ops_notices_*`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = LabelCache(Counter("trading_ops_notices", "Notices published, by kind", ["kind"],
                                            registry=registry))
        self.consumer = ConsumerMetrics("trading_ops_notices", registry)


class NoticeRelay:
    """The `notices` group on `trading:events`: each notice is published before its entry is acknowledged."""

    def __init__(self, client: redis.asyncio.Redis, publish: Publish, metrics: NoticeMetrics,
                 rules: NoticeRules | None = None) -> None:
        self.publish = publish
        self.rules = rules or NoticeRules()
        self.metrics = metrics
        self.consumer = GroupConsumer(client, TRADING_EVENTS, GROUP, metrics=metrics.consumer, start_id="$")

    async def run(self) -> None:
        await self.consumer.run(self.relay)

    async def relay(self, entry: StreamEntry, _tx: Pipeline) -> None:
        try:
            event = decode_entry(entry.fields, EVENT_SCHEMA)
            notice = self.rules.notice_for(event)
        except (KeyError, TypeError, ValueError) as exc:  # EntryDecodeError is a ValueError
            raise RejectEntry(f"unreadable event: {exc}") from exc
        if notice is None:
            return
        await self.publish(notice)
        self.metrics.published(notice.kind).inc()
        log.info("notice %s: %s", notice.kind, notice.subject)
