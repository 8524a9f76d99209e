"""Automations the stack needs, created once and kept: re-running `make up` loses none of their state.

`crash-zombie-flow-runs`: a flow run that stopped heartbeating (its process was killed, its host
died) is marked Crashed, which fires the loop's restart trigger. Heartbeats are every 30 s
(prefect.yaml job_variables) and the window is 3x that, so a healthy run is never marked
crashed (shared/prefect-notes.md §2, the false-positive trap). A proactive trigger keeps, per
flow run, that it saw a heartbeat: replacing the automation forgets that, and a run whose process
is already gone is then never marked. So it is created when missing, replaced only when its
definition changed, and otherwise kept.

The loops' restart triggers are automations owned by their deployments, and `prefect deploy`
deletes and recreates those on every deploy. `make up` therefore deploys only when prefect.yaml
or a flow's code changed: `python -m deployments.automations FINGERPRINT` also says whether every
deployment of prefect.yaml is on the server with all its triggers and the Prefect variable
`make_up_deployed` holds FINGERPRINT; `python -m deployments.automations --deployed FINGERPRINT`
records it after a deploy.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml  # type: ignore[import-untyped]  # types-PyYAML is not a dev dependency
from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, RunDeployment
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.variables import Variable

HEARTBEAT_S = 30
ZOMBIE_WINDOW_S = 3 * HEARTBEAT_S
PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"
DEPLOYED_VARIABLE = "make_up_deployed"


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


def _definition(automation: Any) -> Any:
    """What an automation does, without the ids the server gives it."""
    return _sorted_sets({"description": automation.description, "enabled": automation.enabled,
                         "trigger": automation.trigger.model_dump(mode="json", exclude={"id"}),
                         "actions": [action.model_dump(mode="json") for action in automation.actions]})


def _sorted_sets(value: Any) -> Any:
    """Sets (`expect`, `for_each`) dump as lists in a per-process order: compare them sorted."""
    if isinstance(value, dict):
        return {key: _sorted_sets(item) for key, item in value.items()}
    if isinstance(value, list):
        items = [_sorted_sets(item) for item in value]
        return sorted(items) if all(isinstance(item, str) for item in items) else items
    return value


async def ensure_automations() -> list[str]:
    """Create the missing automations and replace changed ones; returns 'name (created|kept|replaced)'."""
    done: list[str] = []
    async with get_client() as client:
        existing = await client.read_automations()
        for automation in [zombie_automation()]:
            same_name = [old for old in existing if old.name == automation.name]
            if len(same_name) == 1 and _definition(same_name[0]) == _definition(automation):
                done.append(f"{automation.name} (kept)")
                continue
            for old in same_name:
                await client.delete_automation(old.id)
            await automation.acreate()
            done.append(f"{automation.name} ({'replaced' if same_name else 'created'})")
    return done


async def deployments_current(fingerprint: str) -> bool:
    """Every deployment of prefect.yaml is on the server with all its triggers, deployed from `fingerprint`."""
    specs: list[dict[str, Any]] = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    async with get_client() as client:
        recorded = await client.read_variable_by_name(DEPLOYED_VARIABLE)
        deployed = {deployment.name: deployment.id for deployment in await client.read_deployments()}
        triggers: dict[UUID, int] = {}
        for automation in await client.read_automations():
            for action in automation.actions:
                if isinstance(action, RunDeployment) and action.deployment_id is not None:
                    triggers[action.deployment_id] = triggers.get(action.deployment_id, 0) + 1
    complete = all(spec["name"] in deployed and triggers.get(deployed[spec["name"]], 0) == len(spec.get("triggers", []))
                   for spec in specs)
    return complete and recorded is not None and recorded.value == fingerprint


async def record_deployed(fingerprint: str) -> None:
    await Variable.aset(DEPLOYED_VARIABLE, fingerprint, overwrite=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--deployed"]:
        asyncio.run(record_deployed(sys.argv[2]))
    else:
        print("automations: " + ", ".join(asyncio.run(ensure_automations())))
        if sys.argv[1:]:
            print("deployments: " + ("current" if asyncio.run(deployments_current(sys.argv[1])) else "deploy"))
