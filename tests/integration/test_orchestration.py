"""prefect.yaml on a real Prefect server (scheduler and automations running, unlike the test harness):
every deployment registers with its schedule, limits and triggers, the scheduler creates runs,
a killed loop is running again within 2 minutes, and a cancelled loop stays stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
import yaml
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.states import Cancelling

from tests.integration.conftest import REPO_ROOT, prefect_cli, prefect_client, wait_until
from trading.lease import LEASE_KEY_PREFIX
from trading.processes import stop_process

BIN = Path(sys.executable).parent
DEPLOYMENTS = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
LOOPS = [d["name"] for d in DEPLOYMENTS if "long-running" in d.get("tags", [])]
OPS = ("kill-switch", "go-live", "flatten")


def _runs(client: SyncPrefectClient, deployment_id: Any) -> list[FlowRun]:
    return client.read_flow_runs(flow_run_filter=FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])))


def test_every_deployment_registers_and_the_scheduler_creates_runs(prefect_server: dict[str, str]) -> None:
    with prefect_client(prefect_server) as client:
        registered = {d.name: d for d in client.read_deployments()}
        assert set(registered) == {d["name"] for d in DEPLOYMENTS}
        assert set(LOOPS) == {"ingest-ticker24h", "ingest-orderbook", "ingest-candles", "signal-engine",
                              "trading-core", "executor", "pnl-orchestrator", "ops-metrics"}
        for spec in DEPLOYMENTS:
            deployment = registered[spec["name"]]
            if spec["name"] in LOOPS or spec.get("schedules"):
                assert deployment.global_concurrency_limit is not None
                assert deployment.global_concurrency_limit.limit == 1, spec["name"]
            if spec.get("schedules"):
                assert all(s.schedule.timezone == "Europe/Amsterdam" for s in deployment.schedules)  # type: ignore[union-attr]
            if spec["name"] in LOOPS:
                assert deployment.parameters["duration_s"] == 3540
                assert deployment.work_queue_name == "trading"
                assert deployment.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
        for name in OPS:  # manual ops flows: the run history says who and why
            properties = registered[name].parameter_openapi_schema["properties"]
            assert {"operator", "reason"} <= set(properties), name
            assert not registered[name].schedules
        automations = {a.name for a in client.read_automations()}
        assert "crash-zombie-flow-runs" in automations

        # The scheduler really creates runs (prefect-notes §0: SQLAlchemy 2.1 silently breaks this).
        deadline = time.monotonic() + 120
        scheduled: list[FlowRun] = []
        while not scheduled and time.monotonic() < deadline:
            time.sleep(2)
            scheduled = [run for run in client.read_flow_runs(limit=200) if run.auto_scheduled]
        assert scheduled, "the scheduler created no run within 120 s"

    # Deploying again (a second `make up`) replaces, it does not duplicate.
    prefect_cli(prefect_server, "--no-prompt", "deploy", "--all")
    subprocess.run([sys.executable, "-m", "deployments.automations"], env=prefect_server, cwd=REPO_ROOT, check=True,
                   capture_output=True, timeout=120)
    with prefect_client(prefect_server) as client:
        assert len(client.read_deployments()) == len(DEPLOYMENTS)
        assert [a.name for a in client.read_automations()].count("crash-zombie-flow-runs") == 1




def test_a_killed_loop_runs_again_within_two_minutes_and_a_cancelled_one_stays_stopped(
        prefect_server: dict[str, str], redis_db_url: str, tmp_path: Path) -> None:
    env = dict(prefect_server, REDIS_URL=redis_db_url, PARQUET_DIR=str(tmp_path / "lake"),
               PREFECT_WORKER_QUERY_SECONDS="2")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "local"], env=env, cwd=REPO_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lease_key = LEASE_KEY_PREFIX + "pnl"
    store = redis.Redis.from_url(redis_db_url, decode_responses=True)
    try:
        with prefect_client(prefect_server) as client:
            deployment = client.read_deployment_by_name("pnl-orchestrator/pnl-orchestrator")
            client.create_flow_run_from_deployment(deployment.id)

            def holder_pid() -> int | None:
                value = store.get(lease_key)
                return int(yaml.safe_load(value)["pid"]) if value else None

            first_pid = wait_until(holder_pid, 90, "the pnl loop to hold its lease")
            killed_at = time.monotonic()
            os.kill(first_pid, signal.SIGKILL)  # the loop's process dies, as on an OOM kill

            def restarted() -> int | None:
                pid = holder_pid()
                return pid if pid is not None and pid != first_pid else None

            try:
                wait_until(restarted, 120, "a new run of the loop")
            except AssertionError as exc:
                states = [(r.name, r.state_type, r.state.message if r.state else "") for r in
                          _runs(client, deployment.id)]
                raise AssertionError(f"{exc}; runs: {states}") from None
            assert time.monotonic() - killed_at < 120
            states = [r.state_type for r in _runs(client, deployment.id)]
            assert StateType.CRASHED in states

            running = wait_until(lambda: [r for r in _runs(client, deployment.id)
                                         if r.state_type == StateType.RUNNING], 30, "the new run to be RUNNING")
            client.set_flow_run_state(running[0].id, Cancelling(message="operator stop (test)"))
            wait_until(lambda: client.read_flow_run(running[0].id).state_type == StateType.CANCELLED, 60,
                      "the cancel")
            time.sleep(20)  # a trigger would have started a new run by now
            assert not [r for r in _runs(client, deployment.id)
                        if r.state_type in (StateType.RUNNING, StateType.PENDING)]
            assert not store.exists(lease_key)
    finally:
        stop_process(worker, timeout_s=20)
        store.close()


def test_a_failed_loop_run_is_restarted_after_its_back_off_and_the_history_says_why(
        prefect_server: dict[str, str], redis_db_url: str, tmp_path: Path) -> None:
    """The restart trigger for Failed (prefect.yaml, `schedule_after: 60`): the next run is created at
    once, Scheduled 60 s after the failure, by the trigger named after the deployment."""
    env = dict(prefect_server, REDIS_URL=redis_db_url, PARQUET_DIR=str(tmp_path / "lake"),
               PREFECT_WORKER_QUERY_SECONDS="2")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "local"], env=env, cwd=REPO_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = redis.Redis.from_url(redis_db_url, decode_responses=True)
    store.set(LEASE_KEY_PREFIX + "pnl", '{"host": "elsewhere", "pid": 1, "started_ms": 0}', px=300_000)
    try:
        with prefect_client(prefect_server) as client:
            deployment = client.read_deployment_by_name("pnl-orchestrator/pnl-orchestrator")
            failing = client.create_flow_run_from_deployment(deployment.id, parameters={"lease_wait_s": 0})
            failed = wait_until(lambda: (run := client.read_flow_run(failing.id)).state_type == StateType.FAILED
                               and run, 120, "the run to fail on the held lease")
            assert "held by host=elsewhere" in (failed.state.message or ""), failed.state.message

            def successor() -> FlowRun | None:
                later = [r for r in _runs(client, deployment.id) if r.created > failed.created]
                return later[0] if later else None

            restart = wait_until(successor, 60, "the Failed trigger's run")
            assert restart.state_type == StateType.SCHEDULED
            assert restart.created_by is not None and restart.created_by.type == "AUTOMATION"
            assert restart.created_by.display_value == "pnl-orchestrator restarts 60 s after a Failed run"
            assert restart.next_scheduled_start_time is not None and failed.state.timestamp is not None
            back_off = (restart.next_scheduled_start_time - failed.state.timestamp).total_seconds()
            assert 50 <= back_off <= 75, back_off
            client.set_flow_run_state(restart.id, Cancelling(message="test over"), force=True)
    finally:
        stop_process(worker, timeout_s=20)
        store.close()
