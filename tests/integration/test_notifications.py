"""Notifications through Prefect, end to end on a real Prefect server (triggers and actions running).

`deployments.automations` with NOTIFY_URL pointing at a local HTTP receiver (make up's own step)
saves the notification block and the two notification automations. The real `ops-metrics` flow
runs in its own process, relaying `trading:events` to Prefect events; the test writes what the
loops and operator flows write (through their own functions: the kill switch, a go-live decision,
a preflight NO-GO, a consumer's dead letters, daily-loss rejects, a ledger anomaly) among routine
noise, and a loop-tagged flow run fails. The receiver gets one message per notable event (the
throttled ones once), none for noise; each says what, where, and which runbook section. Without
NOTIFY_URL the automations and the block are removed again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from prometheus_client import CollectorRegistry

from tests.integration.conftest import REPO_ROOT, prefect_client, wait_until
from trading.bus import TRADING_EVENTS, as_text
from trading.consumer import ConsumerMetrics, GroupConsumer, StreamEntry
from trading.events import Severity, queue_event
from trading.golive import DECISION_GO, DECISION_NO_GO, record_decision
from trading.kill_switch import set_kill_switch
from trading.notices import GROUP
from trading.processes import free_port, stop_process

pytestmark = pytest.mark.integration

T_DAY_MS = 24 * 3_600_000


@contextmanager
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """An HTTP server on loopback that keeps every JSON body POSTed to it."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook", received
    finally:
        server.shutdown()
        server.server_close()


def automations(env: dict[str, str], **extra: str) -> str:
    result = subprocess.run([sys.executable, "-m", "deployments.automations"], env=dict(env, **extra), cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


OPS_METRICS = """
import asyncio, sys
from flows.ops_metrics import ops_metrics
asyncio.run(ops_metrics(duration_s=600, metrics_port=int(sys.argv[1]), interval_s=5))
"""

FAILING_LOOP = """
from prefect import flow, tags

@flow(name="failing-loop")
def failing_loop() -> None:
    raise RuntimeError("the loop's input went away")

with tags("long-running"):
    failing_loop(return_state=True)
"""


def relay_ready(client: redis.Redis) -> bool:
    try:
        return any(as_text(group["name"]) == GROUP for group in client.xinfo_groups(TRADING_EVENTS))
    except redis.ResponseError:  # no stream yet
        return False


async def write_events(url: str) -> None:
    """What the loops and operator flows write, notable and noise interleaved, as their own code writes it."""
    client = redis.asyncio.Redis.from_url(url, decode_responses=True)
    try:
        await set_kill_switch(client, enabled=True, operator="alice", reason="notification drill")
        async with client.pipeline(transaction=True) as tx:
            for n in range(20):  # routine: guard rejects, the core's refusals while the switch is on, orders
                queue_event(tx, "reject", Severity.WARNING, market="BTC-EUR", detail={"guard": "cooldown"})
                queue_event(tx, "kill_switch", Severity.WARNING, market="BTC-EUR", detail={"signal_id": f"s-{n}"})
                queue_event(tx, "order", Severity.INFO, market="BTC-EUR", intent_id=f"i-{n}", detail={})
            for _ in range(3):  # the daily-loss guard trips again and again: said once
                queue_event(tx, "reject", Severity.WARNING, market="ETH-EUR", detail={
                    "guard": "daily_loss", "measured": "-120.5", "limit": "-100", "reason": "over the daily loss"})
            queue_event(tx, "ledger_anomaly", Severity.CRITICAL, market="BTC-EUR", intent_id="i-9",
                        detail={"mode": "live", "reason": "a live sell filled beyond the live ledger's position"})
            await tx.execute()
        consumer = GroupConsumer(client, "orders:shadow", "executor", metrics=ConsumerMetrics("t", CollectorRegistry()))
        for n in range(5):  # a burst of bad intents: one message for the stream
            await consumer.dead_letter(StreamEntry("orders:shadow", f"{n + 1}-0", {"bad": "entry"}, 1),
                                       "intent lacks 'market'", cause="rejected")
        now = await client.time()
        now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
        for _ in range(2):  # hourly preflights saying NO-GO: said once
            await record_decision(client, decision=DECISION_NO_GO, operator="preflight",
                                  reason="NO-GO: stale book", decided_ms=now_ms, valid_for_ms=T_DAY_MS)
        await record_decision(client, decision=DECISION_GO, operator="carol", reason="checklist reviewed",
                              decided_ms=now_ms, valid_for_ms=12 * 3_600_000)
        await set_kill_switch(client, enabled=False, operator="bob", reason="drill over")
    finally:
        await client.aclose()


def subjects(received: list[dict[str, Any]]) -> list[str]:
    return sorted(message["subject"] for message in received)


async def test_notable_events_reach_the_webhook_once_and_noise_never(prefect_server: dict[str, str],
                                                                    redis_db_url: str, tmp_path: Path) -> None:
    with receiver() as (notify_url, received):
        said = automations(prefect_server, NOTIFY_URL=notify_url)
        assert "notify-trading-notices (created)" in said and "notify-run-ended (created)" in said, said
        assert notify_url not in said  # the URL is a secret of the block
        again = automations(prefect_server, NOTIFY_URL=notify_url)  # a second make up keeps them
        assert "notify-trading-notices (kept)" in again and "notify-run-ended (kept)" in again, again

        env = dict(prefect_server, REDIS_URL=redis_db_url, PARQUET_DIR=str(tmp_path / "lake"))
        log = (tmp_path / "ops-metrics.log").open("w")
        relay = subprocess.Popen([sys.executable, "-c", OPS_METRICS, str(free_port())], env=env, cwd=REPO_ROOT,
                                 stdout=log, stderr=subprocess.STDOUT)
        try:
            check = redis.Redis.from_url(redis_db_url)
            wait_until(lambda: relay.poll() is None and relay_ready(check), 120, "the notices relay's group",
                       tmp_path / "ops-metrics.log")
            await write_events(redis_db_url)
            failing = subprocess.run([sys.executable, "-c", FAILING_LOOP], env=env, cwd=REPO_ROOT,
                                     capture_output=True, text=True, timeout=120)
            assert "the loop's input went away" in failing.stdout + failing.stderr

            expected = ["[critical] Daily-loss limit reached", "[critical] Kill switch ON: no new orders",
                        "[critical] Ledger anomaly on BTC-EUR (live)", "[critical] Preflight NO-GO: the live gate",
                        "[critical] failing-loop run", "[warning] Entries dead-lettered on orders:shadow",
                        "[warning] Go-live decision: GO by carol", "[warning] Kill switch OFF: trading may resume"]
            wait_until(lambda: len(received) >= len(expected), 180, f"{len(expected)} messages (got "
                       f"{subjects(received)})", tmp_path / "ops-metrics.log")
            # Every event was relayed (the group acknowledged all) and the automations had time to act:
            # a message for a noise event would have arrived with or before the last expected one.
            wait_until(lambda: check.xpending(TRADING_EVENTS, GROUP)["pending"] == 0, 30, "the relay acknowledged all")
        finally:
            stop_process(relay, timeout_s=20)
            log.close()

        got = subjects(received)
        assert len(got) == len(expected), got
        for prefix, subject in zip(sorted(expected), got, strict=True):
            assert subject.startswith(prefix), (prefix, got)
        by_subject = {message["subject"]: message for message in received}
        kill = next(m for s, m in by_subject.items() if "Kill switch ON" in s)
        assert "alice" in kill["body"] and "docs/runbooks.md#kill-switch-and-flatten" in kill["body"]
        assert "Recorded by kill-switch: http" in kill["body"]  # the deployment's page in the UI
        daily = next(m for s, m in by_subject.items() if "Daily-loss" in s)
        assert "ETH-EUR" in daily["body"] and "-120.5" in daily["body"]
        ended = next(m for s, m in by_subject.items() if "failing-loop" in s)
        assert "Failed" in ended["subject"] and "/runs/flow-run/" in ended["body"]
        assert "docs/runbooks.md#restarting-a-loop" in ended["body"]

        # NOTIFY_URL unset: no notifications, nothing left behind.
        off = automations(prefect_server)
        assert "notify-trading-notices (removed" in off and "notify-run-ended (removed" in off, off
        with prefect_client(prefect_server) as client:
            assert not {a.name for a in client.read_automations()} & {"notify-trading-notices", "notify-run-ended"}
            assert "trading-notify" not in {b.name for b in client.read_block_documents()}
