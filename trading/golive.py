"""The live gate (design §3): live orders need a fresh GO decision and the kill switch off.

The go-live flow writes its decision to the `trading:golive` hash (decision, decided_ms,
valid_until_ms, operator, record); a NO-GO preflight or a kill switch closes the gate. The
trading core and the executor ask `live_gate()` before every live intent or order, so a gate
that closes stops live trading at the next order, without a restart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis.exceptions import WatchError

from trading.bus import KEY_GOLIVE, KEY_KILL, as_text
from trading.events import Severity, queue_event

DECISION_GO = "GO"
DECISION_NO_GO = "NO-GO"


@dataclass(frozen=True)
class GateStatus:
    open: bool
    reason: str



def gate_from_state(kill: Any, record: dict[Any, Any], now_ms: int) -> GateStatus:
    """The gate given the kill key's value and the decision hash (pure: tests and preflight use it)."""
    if kill is not None and as_text(kill) == "1":
        return GateStatus(False, "kill switch is on (trading:kill=1)")
    fields = {as_text(k): as_text(v) for k, v in record.items()}
    decision = fields.get("decision")
    if decision is None:
        return GateStatus(False, "no go-live decision recorded (run the go-live flow)")
    if decision != DECISION_GO:
        return GateStatus(False, f"latest go-live decision is {decision} ({fields.get('reason', 'no reason given')})")
    try:
        valid_until = int(fields.get("valid_until_ms", ""))
    except ValueError:
        return GateStatus(False, "go-live record has no valid_until_ms; run the go-live flow again")
    if now_ms >= valid_until:
        return GateStatus(False, f"go-live decision expired at {valid_until} ms; run the go-live flow again")
    return GateStatus(True, f"GO by {fields.get('operator', '?')} valid until {valid_until} ms")


async def live_gate(client: Any, now_ms: int) -> GateStatus:
    """Read the kill switch and the latest decision in one round trip and judge the gate."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.get(KEY_KILL)
        pipe.hgetall(KEY_GOLIVE)
        kill, record = await pipe.execute()
    return gate_from_state(kill, record, now_ms)


class DecisionSupersededError(RuntimeError):
    """Another decision (e.g. a NO-GO preflight) was recorded while this one was being made."""


async def latest_decided_ms(client: Any) -> str | None:
    value = await client.hget(KEY_GOLIVE, "decided_ms")
    return None if value is None else as_text(value)


async def record_decision(client: Any, *, decision: str, operator: str, reason: str, decided_ms: int,
                          valid_for_ms: int, record: str = "", unless_changed_since: str | None = None) -> None:
    """Replace the latest decision (the go-live flow; a NO-GO preflight closes the gate with it), with a
    `go_live_decision` event on `trading:events` in the same transaction.

    With `unless_changed_since` (the `decided_ms` read before deciding, "" for none), a decision
    recorded meanwhile wins: `DecisionSupersededError`, nothing written. A GO never overwrites a
    NO-GO it did not see.
    """
    if decision not in (DECISION_GO, DECISION_NO_GO):
        raise ValueError(f"decision must be {DECISION_GO} or {DECISION_NO_GO}, got {decision!r}")
    if valid_for_ms <= 0:
        raise ValueError("valid_for_ms must be positive")
    fields = {"decision": decision, "operator": operator, "reason": reason, "decided_ms": decided_ms,
              "valid_until_ms": decided_ms + valid_for_ms, "record": record}
    async with client.pipeline(transaction=True) as pipe:
        if unless_changed_since is not None:
            await pipe.watch(KEY_GOLIVE)
            if (await latest_decided_ms(pipe) or "") != unless_changed_since:
                raise DecisionSupersededError("a newer go-live decision was recorded meanwhile")
            pipe.multi()
        pipe.delete(KEY_GOLIVE)
        pipe.hset(KEY_GOLIVE, mapping=fields)
        queue_event(pipe, "go_live_decision", Severity.WARNING, ts=decided_ms, detail={
            "decision": decision, "operator": operator, "reason": reason, "valid_until_ms": fields["valid_until_ms"]})
        try:
            await pipe.execute()
        except WatchError:
            raise DecisionSupersededError("a newer go-live decision was recorded meanwhile") from None


@dataclass(frozen=True)
class DecisionRecord:
    """A dated go-live decision, kept as markdown in the lake (`decisions/`) and backed up with it."""

    decision: str
    requested: str  # what the operator asked for; the decision is NO-GO when preflight said so
    operator: str
    participants: tuple[str, ...]
    risks: str
    reason: str
    decided_ms: int
    valid_until_ms: int
    preflight_go: bool
    preflight_rows: tuple[dict[str, str], ...]

    def markdown(self) -> str:
        decided = datetime.fromtimestamp(self.decided_ms / 1000, UTC).isoformat(timespec="seconds")
        until = datetime.fromtimestamp(self.valid_until_ms / 1000, UTC).isoformat(timespec="seconds")
        lines = [f"# Go-live decision: {self.decision}", "",
                 f"- decided: {decided} (UTC)", f"- valid until: {until} (UTC)" if self.decision == DECISION_GO
                 else "- valid until: not applicable (NO-GO)",
                 f"- requested: {self.requested}", f"- operator: {self.operator}",
                 f"- participants: {', '.join(self.participants) or '(none named)'}",
                 f"- reason: {self.reason}", "", "## Risks", "", self.risks or "(none stated)", "",
                 f"## Preflight: {'GO' if self.preflight_go else 'NO-GO'}", "",
                 "| check | status | detail |", "|---|---|---|"]
        lines += [f"| {r['check']} | {r['status']} | {r['detail'].replace('|', '/')} |" for r in self.preflight_rows]
        return "\n".join(lines) + "\n"


def write_record(parquet_dir: Path, record: DecisionRecord) -> Path:
    """`<lake>/decisions/YYYY-MM-DD/go-live-HHMMSSZ.md`, written to a temp file, fsynced and renamed."""
    stamp = datetime.fromtimestamp(record.decided_ms / 1000, UTC)
    directory = parquet_dir / "decisions" / stamp.date().isoformat()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"go-live-{stamp:%H%M%S}Z.md"
    temp = path.with_suffix(".md.tmp")
    with open(temp, "w") as handle:
        handle.write(record.markdown())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    return path
