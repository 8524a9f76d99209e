"""Preflight on a healthy simulated stack is GO; it is NO-GO, naming the failed check, when the kill
switch is on, a loop is stopped, or Redis is down. A real Prefect server, worker and automation."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import redis.asyncio
from prefect.client.orchestration import get_client
from prefect.states import Failed, Scheduled

from deployments.automations import ensure_automations
from flows.maintenance import backup, lake_compaction, lake_rotation
from flows.preflight import PreflightNoGo, _schedule_history, preflight, run_checklist
from tests.integration.conftest import SimHandle
from tests.integration.stack import LOOPS, running_stack, stack_settings
from trading.bus import KEY_KILL, KEY_PNL_LIVE
from trading.clock import now_ms
from trading.golive import DECISION_GO, live_gate, record_decision
from trading.orders import ExecutionReport, FillRecord
from trading.pnl import Ledger
from trading.preflight import ScheduleHistory, Status, Verdict, check_live_ledger, check_ran_within
from trading.processes import free_port, stop_process
from trading.redis_conn import async_client

BIN = Path(sys.executable).parent


@pytest.fixture
def worker(prefect_api: str) -> Iterator[subprocess.Popen[bytes]]:
    env = dict(os.environ, PREFECT_API_URL=prefect_api)
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", "local", "--type", "process", "--overwrite"],
                   env=env, check=True, capture_output=True)
    process = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "local"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield process
    finally:
        stop_process(process, timeout_s=15)


def _failed(verdict: Verdict) -> dict[str, str]:
    return {c.name: c.detail for c in verdict.checks if c.status is Status.FAIL}


async def test_preflight_go_then_no_go_for_kill_switch_stopped_loop_and_redis_down(
        sim: SimHandle, redis_db_url: str, tmp_path: Path, worker: subprocess.Popen[bytes],
        monkeypatch: pytest.MonkeyPatch) -> None:
    lake = tmp_path / "lake"
    settings = stack_settings(sim, redis_db_url, lake)
    monkeypatch.setenv("REDIS_URL", redis_db_url)
    monkeypatch.setenv("PARQUET_DIR", str(lake))
    await ensure_automations()

    async def checklist(url: str, ports: dict[str, int]) -> Verdict:
        return await run_checklist(settings, url, live=False, drill=True, loops=LOOPS, stream_max_age_s=30,
                                   min_free_gb=0.01, lake_quiet_s=60, check_maintenance=True, metrics_ports=ports)

    async with running_stack(settings, redis_db_url) as stack:
        await stack.wait_until_running()
        async with asyncio.timeout(30):  # the streams and today's lake partition have data
            while not (await stack.client.xlen("bitvavo:ticker24h") and await stack.client.xlen("bitvavo:book")
                       and any(lake.glob("*/orderbook/top/*.jsonl"))):
                await asyncio.sleep(0.2)
        for maintenance in (lake_compaction, lake_rotation, backup):
            await asyncio.to_thread(maintenance)
        async with asyncio.timeout(20):  # the worker's first heartbeat
            while "automations and a worker" in _failed(verdict := await checklist(redis_db_url, stack.ports)):
                await asyncio.sleep(1)
        assert verdict.go, _failed(verdict)
        assert {c.name for c in verdict.checks} >= {
            "code compiles", "redis reachable, memory below 70%", "kill switch off", "loops running (leases held)",
            "ingest streams fresh", "signal engine producing", "kill-switch drill", "metrics endpoints",
            "lake writable, space, today growing", "automations and a worker", "last backup restores", "live ledger"}
        assert await stack.client.get(KEY_KILL) is None  # the drill put the switch back

        await stack.client.set(KEY_KILL, "1")
        verdict = await checklist(redis_db_url, stack.ports)
        assert not verdict.go and "kill switch off" in _failed(verdict)
        assert await stack.client.get(KEY_KILL) == "1"  # the drill leaves a switch that was on, on
        await stack.client.delete(KEY_KILL)

        await stack.stop_loop("executor")
        failed = _failed(await checklist(redis_db_url, stack.ports))
        assert "executor" in failed["loops running (leases held)"]
        assert "executor" in failed["metrics endpoints"]

    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    failed = _failed(await checklist(dead_redis, {}))
    assert "redis reachable, memory below 70%" in failed


async def test_a_no_go_preflight_run_fails_and_closes_the_live_gate(
        redis_db_url: str, tmp_path: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_db_url)
    monkeypatch.setenv("PARQUET_DIR", str(tmp_path / "lake"))
    client = async_client(redis_db_url)
    try:
        await record_decision(client, decision=DECISION_GO, operator="test", reason="test", decided_ms=now_ms(),
                              valid_for_ms=3_600_000)
        assert (await live_gate(client, now_ms())).open
        with pytest.raises(PreflightNoGo, match="loops running"):  # nothing runs here; a caller gets the exception
            await preflight(drill=False, check_maintenance=False)
        gate = await live_gate(client, now_ms())
        assert not gate.open and "NO-GO" in gate.reason

        # What the UI shows first: the run's state message is the readable list of failed checks.
        state = await preflight(drill=False, check_maintenance=False, return_state=True)
        assert state.is_failed() and state.message is not None
        assert state.message.startswith("NO-GO (dry-run): ")
        assert "loops running (leases held): not running" in state.message
        assert "Traceback" not in state.message and "PreflightNoGo" not in state.message
        async with get_client() as prefect:
            stored = await prefect.read_flow_run(state.state_details.flow_run_id)
        assert stored.state is not None and stored.state.message == state.message
    finally:
        await client.aclose()


async def test_maintenance_on_a_fresh_deployment_is_not_yet_due_until_a_scheduled_run_comes_due(
        prefect_api: str) -> None:
    job = f"preflight-job-{uuid.uuid4().hex[:8]}"
    now = now_ms()
    async with get_client() as prefect:
        deployment_id = await prefect.create_deployment(flow_id=await prefect.create_flow_from_name(job), name=job)
    fresh = await _schedule_history(job, now)
    assert fresh == ScheduleHistory(None, f"{job}/{job}", None)
    dry = check_ran_within(job, fresh, 26 * 3_600_000, now, live=False)
    assert dry.status is Status.SKIP and f"`prefect deployment run {job}/{job}`" in dry.detail
    assert check_ran_within(job, fresh, 26 * 3_600_000, now, live=True).status is Status.FAIL

    async with get_client() as prefect:  # a scheduled run came due two hours ago, and failed
        run = await prefect.create_flow_run_from_deployment(
            deployment_id, state=Scheduled(scheduled_time=datetime.now(UTC) - timedelta(hours=2)))
        await prefect.set_flow_run_state(run.id, Failed(message="disk full"), force=True)
    due = await _schedule_history(job, now_ms())
    assert due.due_run is not None and due.due_run[0] == "Failed"
    result = check_ran_within(job, due, 26 * 3_600_000, now_ms(), live=False)
    assert result.status is Status.FAIL and "newest due run is Failed, scheduled 2.0 h ago" in result.detail


async def test_the_checklist_shows_the_live_ledger_and_fails_live_without_a_fresh_one(
        client: redis.asyncio.Redis) -> None:
    now = now_ms()
    for live in (True, False):  # nothing written: live fails, dry-run only says so
        result = await check_live_ledger(client, now, live=live)
        assert result.status is (Status.FAIL if live else Status.SKIP)
        assert "trading:pnl:live is not written" in result.detail
    ledger = Ledger()
    ledger.apply(ExecutionReport(
        intent_id="i1", order_id="o1", market="BTC-EUR", side="buy", status="filled", filled_amount=Decimal("0.01"),
        filled_amount_quote=Decimal("700"), fee=Decimal("1.75"), fee_currency="EUR", dry_run=False, ts=now,
        fills=(FillRecord("f1", now, Decimal("0.01"), Decimal("70000"), Decimal("1.75"), "EUR", True),)))
    await client.hset(KEY_PNL_LIVE, mapping=ledger.snapshot(now))  # type: ignore[arg-type]
    result = await check_live_ledger(client, now + 1_000, live=True)
    assert result.status is Status.PASS
    assert result.detail.startswith("positions: BTC-EUR 0.01; exposure 700 EUR; realised today -1.75 EUR")
    stale = await check_live_ledger(client, now + 60_000, live=True)
    assert stale.status is Status.FAIL and "the PnL loop is not running" in stale.detail
