"""The loops' runs as `make up` sees them: the deployments tagged `long-running` in prefect.yaml.

`python -m deployments.loops reconcile WORKER` (before `make up` starts its worker WORKER): a
Running, Pending or Cancelling loop run that nothing executes any more is ended, never trusted:
a run picked up by WORKER (that worker is not running: `make up` starts it only afterwards, and
stopped whatever a previous `make up` left), or one without a heartbeat for `STALE_S` (its
process or host died). Running and Pending runs become Crashed, so the loop's restart trigger
starts the next segment; Cancelling runs become Cancelled. Runs of a worker elsewhere that still
heartbeats are left alone. Each ended run's state message says why.

`python -m deployments.loops start`: start every loop that has no live run. A run the restart
trigger created (a Crashed run's successor, or a Failed run's after its back-off) counts as live;
for a loop whose run `reconcile` just crashed, the trigger's run is awaited for `TRIGGER_WAIT_S`
before one is created, so `make up` starts nothing twice (the deployment's CANCEL_NEW limit would
cancel a duplicate anyway).

`python -m deployments.loops stop [TIMEOUT_S]` (`make up` stopping): cancel the loops' active and
trigger-made scheduled runs (Cancelled runs are not restarted by the triggers), then wait until
they are terminal, at most TIMEOUT_S. What is still Cancelling then is named; the next
`reconcile` ends it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterTags,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.client.schemas.responses import DeploymentResponse
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from prefect.states import Cancelled, Cancelling, Crashed

ACTIVE = [StateType.RUNNING, StateType.PENDING, StateType.CANCELLING]
HEARTBEAT_S = 30  # prefect.yaml: PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the loops
STALE_S = 3 * HEARTBEAT_S  # as the zombie automation: never a healthy run (shared/prefect-notes.md §2)
TRIGGER_WAIT_S = 20.0
WORKER_LABEL = "prefect.worker.name"


async def _loops(client: PrefectClient) -> list[DeploymentResponse]:
    return await client.read_deployments(
        deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=["long-running"])))


async def _runs(client: PrefectClient, deployment_ids: list[UUID], states: list[StateType]) -> list[FlowRun]:
    if not deployment_ids:
        return []
    return await client.read_flow_runs(flow_run_filter=FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=deployment_ids),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states))))


async def _heartbeating(client: PrefectClient, runs: list[FlowRun], since: datetime) -> set[str]:
    """The ids of those runs that sent a heartbeat since `since`."""
    if not runs:
        return set()
    page = await client.read_events(filter=EventFilter(
        occurred=EventOccurredFilter.model_validate({"since": since}),
        event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}" for run in runs])), limit=50)  # the API maximum
    return {event.resource.id.removeprefix("prefect.flow-run.") for event in page.events}


def why_orphaned(run: FlowRun, worker: str, heartbeating: set[str], now: datetime) -> str | None:
    """Why nothing executes `run` any more, or None when something may still (see the module doc)."""
    ran_by = run.labels.get(WORKER_LABEL)
    if ran_by == worker:
        return f"its worker {worker} is gone (the stack stopped without finishing this run)"
    entered = run.state.timestamp if run.state else run.created
    if str(run.id) not in heartbeating and entered is not None and now - entered > timedelta(seconds=STALE_S):
        return f"no heartbeat for {STALE_S}s (worker {ran_by or 'unknown'})"
    return None


async def reconcile(worker: str) -> list[str]:
    """End the loop runs nothing executes any more; returns 'deployment: run (why)' lines."""
    now = datetime.now(UTC)
    ended: list[str] = []
    async with get_client() as client:
        loops = await _loops(client)
        names: dict[UUID | None, str] = {d.id: d.name for d in loops}
        runs = await _runs(client, [d.id for d in loops], ACTIVE)
        heartbeating = await _heartbeating(client, runs, now - timedelta(seconds=STALE_S))
        for run in runs:
            why = why_orphaned(run, worker, heartbeating, now)
            if why is None:
                continue
            cancelling = run.state_type == StateType.CANCELLING
            state: State[Any] = (Cancelled(message=f"make up: {why}; cancel completed") if cancelling
                     else Crashed(message=f"make up: {why}; the restart trigger starts a new run"))
            await client.set_flow_run_state(run.id, state, force=True)
            ended.append(f"{names.get(run.deployment_id)}: {run.name} {run.state_name} -> {state.name} ({why})")
    return ended


def _live(run: FlowRun, soon: datetime) -> bool:
    """Running or about to: active, a trigger's scheduled run (whatever its back-off), a watchdog run due soon."""
    if run.state_type in ACTIVE:
        return True
    return not run.auto_scheduled or (run.next_scheduled_start_time or soon) < soon


async def start_idle_loops() -> list[str]:
    started: list[str] = []
    async with get_client() as client:
        loops = await _loops(client)
        just_crashed = {run.deployment_id for run in await _runs(client, [d.id for d in loops], [StateType.CRASHED])
                        if run.state and run.state.message and run.state.message.startswith("make up:")
                        and run.state.timestamp > datetime.now(UTC) - timedelta(minutes=2)}
        deadline = time.monotonic() + TRIGGER_WAIT_S
        for deployment in loops:
            while True:
                soon = datetime.now(UTC) + timedelta(minutes=1)
                runs = await _runs(client, [deployment.id], [*ACTIVE, StateType.SCHEDULED])
                if any(_live(run, soon) for run in runs):
                    break
                if deployment.id not in just_crashed or time.monotonic() > deadline:
                    await client.create_flow_run_from_deployment(deployment.id, tags=["started-by-make-up"])
                    started.append(deployment.name)
                    break
                await asyncio.sleep(1)
    return sorted(started)


async def stop_loops(timeout_s: float) -> tuple[list[str], list[str]]:
    """Cancel the loops' runs and wait for them (bounded); returns (cancelled, still cancelling)."""
    cancelled: list[str] = []
    async with get_client() as client:
        loops = await _loops(client)
        runs = await _runs(client, [d.id for d in loops], [*ACTIVE, StateType.SCHEDULED])
        waiting: list[UUID] = []
        for run in runs:
            if run.state_type == StateType.SCHEDULED:
                if not run.auto_scheduled:  # a trigger's restart: stopping means stopped
                    await client.set_flow_run_state(run.id, Cancelled(message="make up is stopping"), force=True)
                continue
            await client.set_flow_run_state(run.id, Cancelling(message="make up is stopping"), force=True)
            cancelled.append(run.name)
            waiting.append(run.id)
        deadline = time.monotonic() + timeout_s
        left: list[FlowRun] = []
        while waiting:
            left = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=waiting), state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE))))
            if not left or time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
    return cancelled, [run.name for run in left]


def main(args: list[str]) -> int:
    if args[:1] == ["reconcile"] and len(args) == 2:
        ended = asyncio.run(reconcile(args[1]))
        print("loop runs ended: " + ("; ".join(ended) or "none (nothing stale)"))
    elif args == ["start"]:
        names = asyncio.run(start_idle_loops())
        print("loops started: " + (", ".join(names) if names else "none (all already running)"))
    elif args[:1] == ["stop"] and len(args) <= 2:
        cancelled, left = asyncio.run(stop_loops(float(args[1]) if len(args) == 2 else 40.0))
        print("loops cancelled: " + (", ".join(cancelled) or "none")
              + (f"; still cancelling (ended by the next make up): {', '.join(left)}" if left else ""))
    else:
        print("usage: python -m deployments.loops reconcile WORKER | start | stop [TIMEOUT_S]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
