"""`go-live`: the decision to trade live, with who, why and the risks, checked by preflight.

The gate opens only when the operator asks for GO AND a live preflight run in this flow says
GO; the decision record (markdown in `<lake>/decisions/`, plus an artifact) is written either
way. A NO-GO ends the run Failed. The gate closes again when the record expires, when the kill
switch is set, or when a later preflight says NO-GO.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact

from blocks.runtime import load_settings
from flows.links import flow_run_link
from flows.preflight import PreflightNoGo, preflight
from trading.clock import now_ms
from trading.golive import (
    DECISION_GO,
    DECISION_NO_GO,
    DecisionRecord,
    latest_decided_ms,
    record_decision,
    write_record,
)
from trading.kill_switch import require_operator
from trading.redis_conn import connected


class GoLiveRefused(RuntimeError):
    """The decision is NO-GO; the message says why."""


@flow(name="go-live")
async def go_live(operator: str, reason: str, participants: list[str], risks: str,
                  decision: Literal["GO", "NO-GO"] = "GO", valid_for_h: float = 12.0) -> dict[str, Any]:
    """Record a go-live decision; the live gate opens only on GO with a GO preflight.

    Args:
        operator: who decides (your name); kept in the decision record and on the run.
        reason: why now; kept in the decision record.
        participants: who took part in the decision, e.g. ["alice", "bob"].
        risks: the known risks accepted, free text; kept in the decision record.
        decision: GO asks to open the live gate (it opens only if the live preflight says GO too); NO-GO
            closes it.
        valid_for_h: hours a GO stays valid (at most 24): the gate closes when it expires.
    """
    require_operator(operator, reason)
    if decision not in (DECISION_GO, DECISION_NO_GO):
        raise ValueError(f"decision must be {DECISION_GO} or {DECISION_NO_GO}, got {decision!r}")
    if not 0 < valid_for_h <= 24:
        raise ValueError("valid_for_h must be in (0, 24]: a GO is re-decided at least daily")
    logger = get_run_logger()
    # Redis as the go-live user: it reads and writes the decision only. The checklist below is the preflight
    # flow, which connects as the preflight user itself: its drill switches trading:kill, a right only the
    # kill-switch, flatten and preflight users have, so go-live is not given the checklist's grants.
    settings = await load_settings(redis_role="go-live")
    rows: list[dict[str, str]] = []
    async with connected(settings) as client:
        seen = await latest_decided_ms(client) or ""  # a decision recorded after this one wins
    checked = await preflight(live=True, return_state=True)
    preflight_run = checked.state_details.flow_run_id  # linked from the artifact: the checks this decision used
    try:
        rows, preflight_go = (await checked.aresult())["checks"], True
    except PreflightNoGo as exc:
        preflight_go = False
        rows = [{"check": "preflight", "status": "FAIL", "detail": str(exc)}]
    final = DECISION_GO if decision == DECISION_GO and preflight_go else DECISION_NO_GO
    decided = now_ms()
    valid_for_ms = int(valid_for_h * 3_600_000)
    record = DecisionRecord(decision=final, requested=decision, operator=operator, participants=tuple(participants),
                            risks=risks, reason=reason, decided_ms=decided, valid_until_ms=decided + valid_for_ms,
                            preflight_go=preflight_go, preflight_rows=tuple(rows))
    path = write_record(settings.parquet_dir, record)
    async with connected(settings) as client:
        await record_decision(client, decision=final, operator=operator, reason=reason, decided_ms=decided,
                              valid_for_ms=valid_for_ms, record=str(path),
                              unless_changed_since=None if final == DECISION_NO_GO else seen)
    await acreate_markdown_artifact(key="go-live-decision", description=final,
                                    markdown=record.markdown() + _links(settings.parquet_dir, path, preflight_run))
    logger.info("go-live decision %s by %s (requested %s, preflight %s); record %s", final, operator, decision,
                "GO" if preflight_go else "NO-GO", path)
    if final != DECISION_GO:
        raise GoLiveRefused(f"NO-GO: requested {decision}, preflight {'GO' if preflight_go else 'NO-GO'}")
    return {"decision": final, "record": str(path), "valid_until_ms": record.valid_until_ms}


def _links(lake: Path, record: Path, preflight_run: UUID | None) -> str:
    """Where the decision record is, and the preflight run whose checks it holds."""
    lines = ["", "## Links", "", f"- decision record: `{record}` (in the lake: `{record.relative_to(lake)}`, "
             "backed up with it)"]
    if preflight_run is not None:
        lines.append(f"- {flow_run_link('live preflight run', preflight_run)}: the checks above")
    return "\n".join(lines) + "\n"
