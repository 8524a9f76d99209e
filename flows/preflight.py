"""`preflight`: the go-live checklist (trading/preflight.py), run on a schedule and by the go-live flow.

Every check lands in a table artifact (`preflight-checklist`) and the verdict in a markdown
artifact (`preflight-verdict`). A NO-GO closes the live gate (a NO-GO decision in
`trading:golive`) and ends the run Failed, so it stands out in the run history: the flow returns
a Failed state whose message is the list of failed checks (what the UI shows first, with no
traceback); its result is a `PreflightNoGo` with that message, raised to a calling flow.

Maintenance checks on a fresh stack: a job whose first scheduled run has not come due yet (its
deployment is younger than its schedule) is "not yet due", a SKIP in dry-run and a FAIL live,
with the `prefect deployment run ...` that clears it (trading/preflight.py).

Redis as the `preflight` user (blocks/runtime.py), also when the go-live flow runs this one: its
checks read the streams, leases and live ledger, its drill switches `trading:kill` and sends one
signal, and a NO-GO writes the closing decision to `trading:golive`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.states import Failed

from blocks.lake import LakeSettingsMismatchError, alake_paths
from blocks.runtime import load_settings
from deployments.automations import zombie_automation
from flows.lateness import late_note, lateness_s
from trading import preflight as pf
from trading.bus import STREAM_BOOK, STREAM_TICKER24H
from trading.clock import now_ms
from trading.config import Settings
from trading.exchange.rest import BitvavoRest
from trading.golive import DECISION_NO_GO, record_decision
from trading.maintenance.restore import check_backup
from trading.redis_conn import async_client, redis_url

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trading", "flows", "blocks", "deployments")
# A loop by its lease name; a Literal, so the run form offers the names instead of free text.
LoopName = Literal["ingest:ticker24h", "ingest:orderbook", "ingest:candles", "signal-engine", "trading-core",
                   "executor", "pnl", "ops-metrics"]
# loop -> (metrics port, a family every healthy instance exports)
LOOP_METRICS: dict[LoopName, tuple[int, str]] = {
    "ingest:ticker24h": (9611, "ingest_messages"), "ingest:orderbook": (9612, "ingest_messages"),
    "ingest:candles": (9613, "ingest_messages"), "signal-engine": (9601, "trader_signal_engine_consumed"),
    "trading-core": (9602, "trading_core_consumed"), "executor": (9603, "trader_executor_consumed"),
    "pnl": (9604, "trader_pnl_consumed"), "ops-metrics": (9605, "trading_ops_redis_up"),
}
MAINTENANCE_WINDOWS_H = {"lake-compaction": 26, "lake-rotation": 26, "backup": 26}  # flow name -> hours
DUE_GRACE_MS = 3_600_000  # a run scheduled less than this ago may still be pending or running


async def _schedule_history(flow_name: str, now: int) -> pf.ScheduleHistory:
    """When a run of that flow last completed (scheduled or by hand), and, when it is deployed as
    `<flow>/<flow>`, the newest of the deployment's runs that has come due (scheduled over
    `DUE_GRACE_MS` ago: a run scheduled just now may still be starting)."""
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.COMPLETED]))),
            sort=FlowRunSort.END_TIME_DESC, limit=1)
        end = runs[0].end_time if runs else None
        last = int(end.timestamp() * 1000) if end else None
        name = f"{flow_name}/{flow_name}"
        try:
            deployment = await client.read_deployment_by_name(name)
        except ObjectNotFound:
            return pf.ScheduleHistory(last)
        due = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]),
                expected_start_time=FlowRunFilterExpectedStartTime.model_validate(  # validates a stdlib datetime
                    {"before_": datetime.fromtimestamp((now - DUE_GRACE_MS) / 1000, UTC)})),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
    expected = due[0].expected_start_time if due else None
    due_run = (due[0].state_name or "unknown", int(expected.timestamp() * 1000)) if due and expected else None
    return pf.ScheduleHistory(last, name, due_run)


async def _orchestration() -> pf.CheckResult:
    async with get_client() as client:
        automations = [a.name for a in await client.read_automations() if a.enabled]
        workers = await client.read_workers_for_work_pool("local")
    recent = datetime.now(UTC) - timedelta(minutes=2)
    online = sum(1 for w in workers if w.last_heartbeat_time and w.last_heartbeat_time > recent)
    return pf.check_orchestration(automations, [zombie_automation().name], online)


async def run_checklist(settings: Settings, url: str, *, live: bool, drill: bool, loops: Sequence[LoopName],
                        stream_max_age_s: float, min_free_gb: float, lake_quiet_s: float,
                        check_maintenance: bool, metrics_ports: Mapping[LoopName, int] | None = None) -> pf.Verdict:
    now = now_ms()
    # Disk- and network-bound checks run in threads: the flow's event loop also serves its heartbeats.
    checks: list[pf.CheckResult] = [pf.check_live_mode(settings.dry_run, live),
                                    await asyncio.to_thread(pf.check_compiles, ROOT, PACKAGES)]
    client = async_client(url)
    try:
        redis_check = await pf.guarded("redis reachable, memory below 70%", pf.check_redis(client))
        checks.append(redis_check)
        redis_ok = redis_check.status is pf.Status.PASS or "used_memory" in redis_check.detail
        if redis_ok:
            checks += [
                await pf.guarded("kill switch off", pf.check_kill_switch_off(client)),
                await pf.guarded("live ledger", pf.check_live_ledger(client, now_ms(), live=live)),
                await pf.guarded("loops running (leases held)", pf.check_loops_running(client, loops)),
                await pf.guarded("ingest streams fresh", pf.check_streams_fresh(
                    client, (STREAM_BOOK, STREAM_TICKER24H), int(stream_max_age_s * 1000))),
                await pf.guarded("signal engine producing", pf.check_signal_engine(
                    client, settings.signal_stream, STREAM_BOOK, max_lag=1000)),
                await pf.guarded("trading core intents match the mode", pf.check_dry_run_intents(
                    client, settings.dry_run)),
            ]
            if drill:
                checks.append(await pf.guarded("kill-switch drill", pf.kill_switch_drill(
                    client, settings.signal_stream), timeout_s=30))
        else:
            checks.append(pf.failed("redis-dependent checks", "not run: Redis is unreachable"))
    finally:
        await client.aclose()
    ports = {loop: port for loop, (port, _family) in LOOP_METRICS.items()} | dict(metrics_ports or {})
    endpoints: dict[str, tuple[str, Sequence[str]]] = {
        loop: (f"http://{settings.metrics_host}:{ports[loop]}/metrics", [family])
        for loop, (_port, family) in LOOP_METRICS.items() if loop in loops}
    checks.append(await pf.guarded("metrics endpoints", pf.check_metrics_endpoints(endpoints)))
    checks.append(await asyncio.to_thread(pf.check_lake, settings.parquet_dir,
                                          min_free_bytes=int(min_free_gb * 2**30), max_quiet_s=lake_quiet_s,
                                          now=now_ms()))
    checks.append(await pf.guarded("automations and a worker", _orchestration()))
    if check_maintenance:
        backup_not_due = False
        for flow_name, hours in MAINTENANCE_WINDOWS_H.items():
            history = await _schedule_history(flow_name, now)
            checks.append(pf.check_ran_within(f"{flow_name} ran within {hours} h", history, hours * 3_600_000,
                                              now, live=live))
            if flow_name == "backup":
                backup_not_due = history.not_yet_due(hours * 3_600_000, now)
        try:
            backup_root = (await alake_paths(settings.parquet_dir)).backup  # where the backup flow writes
        except LakeSettingsMismatchError as exc:
            checks.append(pf.failed("last backup restores", str(exc)))
        else:
            checks.append(await asyncio.to_thread(_last_backup_restores, backup_root, not_due=backup_not_due,
                                                  live=live))
    checks.append(await asyncio.to_thread(_credentials, settings, live))
    return pf.Verdict("live" if live else "dry-run", tuple(checks))


def _last_backup_restores(backup_root: Path, *, not_due: bool, live: bool) -> pf.CheckResult:
    name = "last backup restores"
    days = sorted(p for p in backup_root.glob("????-??-??") if p.is_dir()) if backup_root.is_dir() else []
    if not days and not_due:
        return pf.not_yet_due(name, f"no backup under {backup_root} yet, the first is scheduled",
                              "`prefect deployment run backup/backup`", live=live)
    if not days:
        return pf.failed(name, f"no backup under {backup_root}")
    check = check_backup(days[-1])
    if not check.ok:
        return pf.failed(name, f"{days[-1].name}: " + "; ".join(check.problems[:3]))
    return pf.passed(name, f"{days[-1].name}: {check.files_checked} files, checksums and reads OK")


def _credentials(settings: Settings, live: bool) -> pf.CheckResult:
    def can_withdraw() -> bool:
        rest = BitvavoRest(settings.bitvavo_rest_url, api_key=settings.bitvavo_api_key,
                           api_secret=settings.bitvavo_api_secret, operator_id=settings.bitvavo_operator_id)
        try:
            return rest.key_can_withdraw()
        finally:
            rest.close()

    try:
        return pf.check_credentials(settings.has_credentials, can_withdraw, live)
    except Exception as exc:  # an unusable key is a failed check with the exchange's reason
        return pf.failed("credentials present, no withdrawal right", f"{type(exc).__name__}: {exc}")


@flow(name="preflight")
async def preflight(live: bool = False, drill: bool = True, loops: list[LoopName] | None = None,
                    stream_max_age_s: float = 60.0, min_free_gb: float = 2.0, lake_quiet_s: float = 300.0,
                    check_maintenance: bool = True, metrics_ports: dict[LoopName, int] | None = None,
                    max_lateness_s: float = 1800.0) -> Any:
    """The go-live checklist. `live=true` checks for live trading (DRY_RUN=false, credentials, no
    withdrawal right); the default checks the dry-run stack. GO returns the summary; NO-GO ends
    the run Failed with the failed checks as its message (a caller gets `PreflightNoGo`).

    A run that starts more than `max_lateness_s` after its schedule (a backlog after downtime)
    still checks everything but skips the kill-switch drill, and says so: flipping the switch at
    an hour nobody planned could block live orders unexpectedly.

    Args:
        live: check for live trading (DRY_RUN=false, credentials without withdrawal right); false checks
            the dry-run stack.
        drill: switch the kill switch on for a moment and check that a test signal is blocked.
        loops: the loops that must be running; empty: all of them.
        stream_max_age_s: the ingest streams' newest entry must be younger than this, seconds.
        min_free_gb: free disk space the lake needs, GiB.
        lake_quiet_s: the lake must have been written within this many seconds.
        check_maintenance: check that compaction, rotation and backup ran within their windows and that the
            last backup restores.
        metrics_ports: a loop's /metrics port when not its default, e.g. {"executor": 9703}.
        max_lateness_s: a run starting later than this after its scheduled time skips the kill-switch drill.
    """
    logger = get_run_logger()
    settings = await load_settings(redis_role="preflight")
    selected = loops if loops is not None else list(LOOP_METRICS)
    lateness = lateness_s()
    late = lateness > max_lateness_s
    if late and drill:
        logger.warning("preflight %s: the kill-switch drill is skipped", late_note(lateness, max_lateness_s))
    with redis_url(settings) as url:
        try:
            verdict = await run_checklist(settings, url, live=live, drill=drill and not late, loops=selected,
                                          stream_max_age_s=stream_max_age_s, min_free_gb=min_free_gb,
                                          lake_quiet_s=lake_quiet_s, check_maintenance=check_maintenance,
                                          metrics_ports=metrics_ports)
        except BaseException as exc:  # a checklist that could not finish is a NO-GO: fail closed
            await _close_gate(url, pf.Verdict("live" if live else "dry-run", (
                pf.failed("preflight", f"did not finish: {type(exc).__name__}: {exc}"),)))
            raise
        if late and drill:
            verdict = pf.Verdict(verdict.mode, (*verdict.checks, pf.skipped(
                "kill-switch drill", f"{late_note(lateness, max_lateness_s)}: not drilled off-schedule")))
        if not verdict.go:
            await _close_gate(url, verdict)
    await acreate_table_artifact(key="preflight-checklist", table=[c.row() for c in verdict.checks],
                                 description=f"preflight {verdict.mode}: {'GO' if verdict.go else 'NO-GO'}")
    await acreate_markdown_artifact(key="preflight-verdict", markdown=verdict.markdown(),
                                    description="GO" if verdict.go else "NO-GO")
    summary = {"go": verdict.go, "mode": verdict.mode, "failed": [c.name for c in verdict.failed],
               "checks": [c.row() for c in verdict.checks]}
    if not verdict.go:
        message = verdict.failure_message()
        logger.error("preflight %s", message)
        # A returned Failed state, not a raised exception: the run's message is this list, with no traceback.
        return Failed(message=message, data=PreflightNoGo(message))
    logger.info("preflight %s: GO (%d checks)", verdict.mode, len(verdict.checks))
    return summary


class PreflightNoGo(RuntimeError):
    """The checklist failed; the message names every failed check."""


async def _close_gate(url: str, verdict: pf.Verdict) -> None:
    client = async_client(url)
    try:
        await record_decision(client, decision=DECISION_NO_GO, operator="preflight",
                              reason="NO-GO: " + ", ".join(c.name for c in verdict.failed),
                              decided_ms=now_ms(), valid_for_ms=1)
    except Exception as exc:  # Redis down: the gate reads a GO that can only be as fresh as Redis allows
        get_run_logger().warning("could not close the live gate: %s: %s", type(exc).__name__, exc)
    finally:
        await client.aclose()
