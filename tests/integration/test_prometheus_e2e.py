"""A real Prometheus scrapes the running stack on the simulator, and the kill-switch alert fires.

The order-book ingest, signal engine, trading core, paper executor, PnL loop and ops exporter run
in-process (the shared `tests/integration/stack.py`) against the simulator and a real Redis.
Prometheus (Debian's binary, from `make tools`) gets the scrape config that
`deployments.prometheus.config.render` writes for those ports, 1 s intervals and the real
`alerts.yml` with `KillSwitchOn`'s `for` set to 0 s (production waits 1 minute). The test checks
through Prometheus' HTTP API that every target is up and exports its catalogued families (and
nothing else), then sets `trading:kill=1` and waits for the alert to fire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.prometheus.config import render
from tests.integration.conftest import SimHandle
from tests.integration.stack import Stack, running_stack, stack_settings
from tests.unit.test_alert_rules import ALERTS, find_tool
from trading.kill_switch import set_kill_switch
from trading.metrics_catalogue import PROMETHEUS_SERIES, catalogue
from trading.ops_metrics import OpsExporter, OpsMetrics
from trading.processes import free_port, stop_process
from trading.redis_conn import async_client

pytestmark = pytest.mark.integration

MARKETS = ("BTC-EUR", "ETH-EUR")
# Prometheus job (deployment name) -> the loop (lease name) the shared stack runs for it.
JOB_LOOPS = {"ingest-orderbook": "ingest:orderbook", "signal-engine": "signal-engine", "trading-core": "trading-core",
             "executor": "executor", "pnl-orchestrator": "pnl", "ops-metrics": "ops-metrics"}
JOBS = tuple(JOB_LOOPS)
# Labelled families that a few seconds of the simulator's book (and the gauge refreshes) always create.
LABELLED = {
    "ingest-orderbook": {"ingest_messages_total", "ingest_last_message_age_seconds", "ingest_stream_length",
                         "ingest_lag_seconds_bucket"},
    "signal-engine": {"trader_signal_engine_consumed_total", "trader_signal_engine_book_entries_total",
                      "trader_signal_engine_pending", "trader_signal_engine_consumer_lag"},
    "trading-core": {"trading_core_pending", "trading_core_consumer_lag"},
    "executor": {"trader_executor_pending", "trader_executor_consumer_lag"},
    "pnl-orchestrator": {"trader_pnl_pending", "trader_pnl_consumer_lag"},
    "ops-metrics": set(),
}


@pytest.fixture
def prometheus_binary() -> str:
    path = find_tool("prometheus")
    if path is None:
        pytest.skip("prometheus not installed: `make tools` (deployments/prometheus/install_tools.sh) needs apt-get")
    return path



def _rules_with_instant_kill_switch_alert(path: Path) -> None:
    document = yaml.safe_load(ALERTS.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == "KillSwitchOn":
                rule["for"] = "0s"
    path.write_text(yaml.safe_dump(document, sort_keys=False))


@contextlib.asynccontextmanager
async def _prometheus(binary: str, workdir: Path, targets: dict[str, str]) -> AsyncIterator[str]:
    """Prometheus on a free port with 1 s scrape and evaluation intervals, once ready; stopped by PID."""
    rules = workdir / "alerts.yml"
    _rules_with_instant_kill_switch_alert(rules)
    config = workdir / "prometheus.yml"
    config.write_text(render(targets, scrape_interval="1s", evaluation_interval="1s", rule_files=[str(rules)]))
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            try:
                await _until(lambda: _ready(base), "Prometheus ready", 15)
            except AssertionError as exc:
                raise AssertionError(f"{exc} (exit code {process.poll()}):\n{log_path.read_text()[-3000:]}") from None
            yield base
        finally:
            stop_process(process)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


async def _api(base: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    reply = await asyncio.to_thread(_get, f"{base}/api/v1/{path}{query}")
    assert reply["status"] == "success", reply
    return reply["data"]


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float,
                 detail: Callable[[], object] = str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what} {detail()}")
        await asyncio.sleep(0.25)


async def _ready(base: str) -> bool:
    try:
        await asyncio.to_thread(_get_text, f"{base}/-/ready")
    except OSError:
        return False
    return True


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
        return text


async def _targets_up(base: str) -> dict[str, str]:
    data = await _api(base, "targets", state="active")
    return {target["labels"]["job"]: target["health"] for target in data["activeTargets"]}


async def _series_of(base: str, job: str) -> set[str]:
    data = await _api(base, "query", query=f'count by (__name__) ({{job="{job}"}})')
    return {sample["metric"]["__name__"] for sample in data["result"]}


async def _alert_states(base: str, name: str) -> list[str]:
    data = await _api(base, "alerts")
    return [alert["state"] for alert in data["alerts"] if alert["labels"]["alertname"] == name]


async def test_prometheus_scrapes_every_loop_and_the_kill_switch_alert_fires(
        sim: SimHandle, redis_db_url: str, tmp_path: Path, prometheus_binary: str) -> None:
    settings = stack_settings(sim, redis_db_url, tmp_path / "lake")
    async with running_stack(settings, redis_db_url, loops=tuple(JOB_LOOPS.values())) as stack:
        ports = {job: stack.ports[loop] for job, loop in JOB_LOOPS.items()}
        await _scrape_and_fire(stack, ports, tmp_path, prometheus_binary)


async def _scrape_and_fire(stack: Stack, ports: dict[str, int], tmp_path: Path, prometheus_binary: str) -> None:
    tasks = list(stack.tasks.values())
    client = stack.client
    cat = catalogue()
    async with _prometheus(prometheus_binary, tmp_path,
                           {job: f"127.0.0.1:{port}" for job, port in ports.items()}) as base:

        targets: dict[str, str] = {}

        async def all_up() -> bool:
            failed = [task for task in tasks if task.done()]
            if failed:  # a loop that stopped is the story, not a timeout
                failed[0].result()
                raise AssertionError("a loop stopped early")
            targets.update(await _targets_up(base))
            return targets == dict.fromkeys(JOBS, "up")

        await _until(all_up, "every loop target up", 20, lambda: targets)

        missing: dict[str, set[str]] = {}

        async def families_present() -> bool:
            for job in JOBS:
                families = cat.families_of_job(job)
                expected = {name for f in families if not f.labels for name in f.series} | LABELLED[job]
                missing[job] = expected - await _series_of(base, job)
            return not any(missing.values())

        await _until(families_present, "each loop's families in Prometheus", 15,
                     lambda: {job: names for job, names in missing.items() if names})
        for job in JOBS:
            exposed = {name for family in cat.families_of_job(job) for name in family.series}
            exposed |= PROMETHEUS_SERIES
            scraped = await _series_of(base, job)
            assert scraped <= exposed, f"{job} exports series missing from docs/metrics.md: {scraped - exposed}"
        for reading in ("trading_ops_redis_up == 1", "trading_ops_redis_used_memory_bytes > 0",
                        "trading_ops_lake_free_bytes > 0", "trading_core_kill_switch == 0"):
            assert (await _api(base, "query", query=reading))["result"], f"no series satisfies {reading}"
        assert await _alert_states(base, "KillSwitchOn") == []  # off: the alert has nothing to say

        await set_kill_switch(client, enabled=True, operator="e2e-test", reason="alert must fire")

        async def firing() -> bool:
            return await _alert_states(base, "KillSwitchOn") == ["firing"]

        await _until(firing, "KillSwitchOn firing", 15)


async def test_ops_exporter_reads_redis_memory_and_the_lake_disk(redis_db_url: str, tmp_path: Path) -> None:
    metrics = OpsMetrics()
    client = async_client(redis_db_url)
    try:
        await OpsExporter(client, tmp_path / "lake" / "not-created-yet", metrics).refresh()
        info = await client.info("memory")
    finally:
        await client.aclose()
    registry = metrics.registry
    assert registry.get_sample_value("trading_ops_redis_up") == 1
    assert registry.get_sample_value("trading_ops_redis_used_memory_bytes") == pytest.approx(
        info["used_memory"], rel=0.5)
    assert registry.get_sample_value("trading_ops_redis_memory_limit_bytes") == (
        info["maxmemory"] or info["total_system_memory"])
    usage = shutil.disk_usage(tmp_path)
    assert registry.get_sample_value("trading_ops_lake_size_bytes") == usage.total
    assert 0 < (registry.get_sample_value("trading_ops_lake_free_bytes") or 0) <= usage.total


async def test_ops_exporter_counts_an_unreachable_redis_and_keeps_going(tmp_path: Path) -> None:
    metrics = OpsMetrics()
    client = async_client(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        exporter = OpsExporter(client, tmp_path, metrics)
        await exporter.refresh()
        await exporter.refresh()
    finally:
        await client.aclose()
    registry = metrics.registry
    assert registry.get_sample_value("trading_ops_redis_up") == 0
    assert registry.get_sample_value("trading_ops_refresh_errors_total", {"source": "redis"}) == 2
    assert (registry.get_sample_value("trading_ops_lake_free_bytes") or 0) > 0  # the lake is still read
