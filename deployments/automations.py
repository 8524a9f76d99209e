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

Notifications (docs/runbooks.md, "Notifications"): with `NOTIFY_URL` set, the notification block
`trading-notify` is saved from it (a Slack or Teams incoming-webhook URL gets Prefect's block for
that service; any other http(s) URL a custom webhook that POSTs `{"subject", "body", "text"}` as
JSON; the URL is kept as a block secret) and two automations send through it:
`notify-trading-notices` (every `trading.notice.*` event the notices relay emits) and
`notify-run-ended` (a loop or maintenance run that ends Crashed or Failed, with its run link).
With `NOTIFY_URL` unset they and the block are removed: no notifications.
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import yaml  # type: ignore[import-untyped]  # types-PyYAML is not a dev dependency
from prefect.automations import Automation
from prefect.blocks.core import Block
from prefect.blocks.notifications import CustomWebhookNotificationBlock, MicrosoftTeamsWebhook, SlackWebhook
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, RunDeployment, SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.types import SecretDict
from prefect.variables import Variable
from pydantic import SecretStr

HEARTBEAT_S = 30
ZOMBIE_WINDOW_S = 3 * HEARTBEAT_S
PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"
DEPLOYED_VARIABLE = "make_up_deployed"
NOTIFY_BLOCK = "trading-notify"
NOTIFY_AUTOMATIONS = ("notify-trading-notices", "notify-run-ended")
NOTIFIED_TAGS = ("long-running", "maintenance")  # the loops (prefect.yaml tags) and backups/compaction/rotation


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


def notification_block(url: str) -> Block:
    """The block that delivers to `url`: Slack's or Teams' own, else a JSON POST (`subject`, `body`, `text`)."""
    host = urlsplit(url).hostname or ""
    if urlsplit(url).scheme not in ("http", "https") or not host:
        raise ValueError("NOTIFY_URL must be an http(s) URL (a Slack/Teams incoming webhook or any JSON receiver)")
    if host == "hooks.slack.com":
        return SlackWebhook(url=SecretStr(url))
    if host.endswith(".webhook.office.com"):
        return MicrosoftTeamsWebhook(url=SecretStr(url))
    return CustomWebhookNotificationBlock(name="trading stack", url="{{notify_url}}",
                                          secrets=SecretDict({"notify_url": url}), headers=None, cookies=None,
                                          json_data={"subject": "{{subject}}", "body": "{{body}}",
                                                     "text": "{{subject}}\n{{body}}"})


def notification_automations(block_id: UUID) -> list[Automation]:
    notices = Automation(
        name="notify-trading-notices",
        description="A message for every notice of the notices relay (trading/notices.py): kill switch, flatten, "
                    "go-live, preflight NO-GO, daily loss, dead letters, executor refusals, ledger anomalies",
        trigger=EventTrigger(expect={"trading.notice.*"},
                             match=ResourceSpecification({"prefect.resource.id": "trading.*"}),
                             posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        actions=[SendNotification(block_document_id=block_id, subject="[{{ event.payload.severity }}] "
                                  "{{ event.payload.subject }}", body="{{ event.payload.body }}")])
    ended = Automation(
        name="notify-run-ended",
        description="A message when a loop or maintenance run ends Crashed or Failed",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed", "prefect.flow-run.Failed"},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification({"prefect.resource.role": "tag",
                                                 "prefect.resource.id": [f"prefect.tag.{t}" for t in NOTIFIED_TAGS]}),
            posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        actions=[SendNotification(
            block_document_id=block_id,
            subject="[critical] {{ flow.name }} run {{ flow_run.name }} ended {{ flow_run.state.name }}",
            body="{{ flow.name }} ({{ deployment.name }}) run {{ flow_run.name }} ended {{ flow_run.state.name }}: "
                 "{{ flow_run.state.message }}\nRun: {{ flow_run|ui_url }}\nA loop restarts by itself (Crashed: at "
                 "once; Failed: after 60 s); a maintenance flow runs again at its next schedule. Runbook: "
                 "docs/runbooks.md#restarting-a-loop")])
    return [notices, ended]


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


async def ensure_automations(notify_url: str | None = None) -> list[str]:
    """Create the missing automations and replace changed ones, with the notification ones only when
    `notify_url` is set (else removed with their block); returns 'name (created|kept|replaced|removed)'."""
    wanted = [zombie_automation()]
    block = notification_block(notify_url) if notify_url else None
    done: list[str] = []
    async with get_client() as client:
        for document in await client.read_block_documents(include_secrets=False):
            # Another service's block of the same name (NOTIFY_URL changed service), or notifications off.
            kept_type = block.get_block_type_name() if block is not None else None
            if document.name == NOTIFY_BLOCK and document.block_type_name != kept_type:
                await client.delete_block_document(document.id)
        if block is not None:
            wanted += notification_automations(await block.asave(NOTIFY_BLOCK, overwrite=True))
        existing = await client.read_automations()
        if block is None:
            for old in [old for old in existing if old.name in NOTIFY_AUTOMATIONS]:
                await client.delete_automation(old.id)
                done.append(f"{old.name} (removed: NOTIFY_URL unset)")
        for automation in wanted:
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
        print("automations: " + ", ".join(asyncio.run(ensure_automations(os.environ.get("NOTIFY_URL") or None))))
        if sys.argv[1:]:
            print("deployments: " + ("current" if asyncio.run(deployments_current(sys.argv[1])) else "deploy"))
