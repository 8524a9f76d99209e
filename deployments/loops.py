"""Start every long-running loop that is not already running (`make up`, after deploying).

A loop deployment is one tagged `long-running` in prefect.yaml. One that has a run pending,
running or scheduled to start within a minute is left alone, so running `make up` twice
starts nothing twice (and the deployment's CANCEL_NEW limit would cancel a duplicate anyway).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterTags,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelling

ACTIVE = [StateType.RUNNING, StateType.PENDING, StateType.CANCELLING]


async def start_idle_loops() -> list[str]:
    started: list[str] = []
    soon = datetime.now(UTC) + timedelta(minutes=1)
    async with get_client() as client:
        loops = await client.read_deployments(
            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=["long-running"])))
        for deployment in loops:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[*ACTIVE, StateType.SCHEDULED]))))
            if any(run.state_type in ACTIVE or (run.next_scheduled_start_time or soon) < soon for run in runs):
                continue
            await client.create_flow_run_from_deployment(deployment.id, tags=["started-by-make-up"])
            started.append(deployment.name)
    return sorted(started)




async def cancel_loops() -> list[str]:
    """Cancel the active runs of every loop (`make up` stopping): Cancelled runs are not restarted by
    their triggers, and the next `make up` starts them again."""
    cancelled: list[str] = []
    async with get_client() as client:
        loops = await client.read_deployments(
            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=["long-running"])))
        runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[d.id for d in loops]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[*ACTIVE, StateType.SCHEDULED]))))
        for run in runs:
            if run.state_type in ACTIVE:
                await client.set_flow_run_state(run.id, Cancelling(message="make up is stopping"), force=True)
                cancelled.append(run.name)
    return cancelled


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["cancel"]:
        print("loops cancelled: " + (", ".join(asyncio.run(cancel_loops())) or "none"))
    else:
        names = asyncio.run(start_idle_loops())
        print("loops started: " + (", ".join(names) if names else "none (all already running)"))
