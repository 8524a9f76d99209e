"""Automations the stack needs, upserted by name (re-running `make up` never duplicates them).

`crash-zombie-flow-runs`: a flow run that stopped heartbeating (its process was killed, its host
died) is marked Crashed, which fires the loop's restart trigger. Heartbeats are every 30 s
(prefect.yaml job_variables) and the window is 3x that, so a healthy run is never marked
crashed (shared/prefect-notes.md §2, the false-positive trap).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

HEARTBEAT_S = 30
ZOMBIE_WINDOW_S = 3 * HEARTBEAT_S


def zombie_automation() -> Automation:
    return Automation(
        name="crash-zombie-flow-runs",
        description=f"Mark a flow run Crashed after {ZOMBIE_WINDOW_S}s without a heartbeat (heartbeat {HEARTBEAT_S}s)",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=ZOMBIE_WINDOW_S)),
        actions=[ChangeFlowRunState(name="Crashed", state=StateType.CRASHED, force=False,
                                   message=f"no heartbeat for {ZOMBIE_WINDOW_S}s")])


async def upsert_automations() -> list[str]:
    """Create or replace every automation of the stack; returns their names."""
    wanted = [zombie_automation()]
    async with get_client() as client:
        existing = await client.read_automations()
        for automation in wanted:
            for old in existing:
                if old.name == automation.name:
                    await client.delete_automation(old.id)
            await automation.acreate()
    return [a.name for a in wanted]


if __name__ == "__main__":
    print("automations:", ", ".join(asyncio.run(upsert_automations())))
