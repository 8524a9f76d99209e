"""The kill switch (`trading:kill`): one Redis key every order path reads before acting.

Flipping it writes a `kill_switch` event in the same transaction, with who and why, so the
event stream and the ops flow's run history tell the same story.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trading.bus import KEY_KILL, KEY_KILL_DRILL
from trading.events import Severity, queue_event


@dataclass(frozen=True)
class KillSwitchChange:
    enabled: bool
    was_enabled: bool


class OperatorRequiredError(ValueError):
    """Ops actions name who did them and why: the run history is the audit log."""


def require_operator(operator: str, reason: str) -> None:
    if not operator.strip() or not reason.strip():
        raise OperatorRequiredError("operator and reason are required (they are the audit trail)")


async def kill_switch_on(client: Any) -> bool:
    return (await client.get(KEY_KILL)) in ("1", b"1")


async def set_kill_switch(client: Any, *, enabled: bool, operator: str, reason: str) -> KillSwitchChange:
    require_operator(operator, reason)
    was = await kill_switch_on(client)
    async with client.pipeline(transaction=True) as tx:
        if enabled:
            tx.set(KEY_KILL, "1")
        else:
            tx.delete(KEY_KILL)
        tx.delete(KEY_KILL_DRILL)  # an operator's flip wins over a drill in progress: it must not undo it
        queue_event(tx, "kill_switch", Severity.CRITICAL if enabled else Severity.WARNING,
                    detail={"enabled": enabled, "was_enabled": was, "operator": operator, "reason": reason})
        await tx.execute()
    return KillSwitchChange(enabled=enabled, was_enabled=was)
