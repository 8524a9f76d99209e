"""The ingest flows through a real Prefect server, and prefect.yaml deployed to it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tests.integration.conftest import REPO_ROOT, SimHandle
from trading.bus import KEY_UNIVERSE, STREAM_BOOK
from trading.clock import now_ms
from trading.lake import channel_files, read_jsonl, utc_day
from trading.redis_conn import EmbeddedRedis

pytestmark = pytest.mark.usefixtures("prefect_api")


def ingest_env(monkeypatch: pytest.MonkeyPatch, sim: SimHandle, redis_url: str, lake: Path,
               markets: str | None = "BTC-EUR,ETH-EUR") -> None:
    for name, value in {"PARQUET_DIR": str(lake), "REDIS_URL": redis_url, "BITVAVO_REST_URL": sim.rest_url,
                        "BITVAVO_WS_URL": sim.ws_url}.items():
        monkeypatch.setenv(name, value)
    if markets:
        monkeypatch.setenv("INGEST_MARKETS", markets)
    else:
        monkeypatch.delenv("INGEST_MARKETS", raising=False)


def lake_rows(lake: Path, channel: str) -> list[dict[str, object]]:
    return [row for path in channel_files(lake, utc_day(now_ms()), channel) for row in read_jsonl(path)]


async def test_orderbook_flow_runs_bounded_and_reports(sim_factory: Callable[..., SimHandle], redis_db_url: str,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.ingest import ingest_orderbook

    sim = sim_factory(markets="BTC-EUR,ETH-EUR", book_rate=40)
    ingest_env(monkeypatch, sim, redis_db_url, tmp_path)
    summary = await ingest_orderbook(duration_s=4, metrics_port=0)
    assert summary["markets"] == ("BTC-EUR", "ETH-EUR") and summary["market_source"] == "INGEST_MARKETS"
    assert summary["handler"]["applied"] > 50 and summary["stream_entries"] == 2 * summary["handler"]["applied"]
    assert len(lake_rows(tmp_path, "orderbook/update")) == summary["handler"]["applied"]


async def test_ticker24h_flow_counts_and_skips_malformed_frames(sim_factory: Callable[..., SimHandle],
                                                               redis_db_url: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.ingest import ingest_ticker24h

    sim = sim_factory(markets="BTC-EUR,ETH-EUR", book_rate=20)
    ingest_env(monkeypatch, sim, redis_db_url, tmp_path)
    run = asyncio.create_task(ingest_ticker24h(duration_s=4, metrics_port=0))
    await asyncio.sleep(2.0)
    sim.inject_frame("this is not json")
    sim.inject_frame('{"event":"ticker24h","data":[{"market":"BTC-EUR","last":"NaN"}]}')
    sim.inject_frame('{"event":"ticker24h","data":"oops"}')
    summary = await run
    assert summary["malformed_frames"] == 1
    assert summary["handler"]["rejected"] == 2 and summary["handler"]["rows"] > 0
    assert all(row.get("last") != "NaN" for row in lake_rows(tmp_path, "ticker24h"))


async def test_a_universe_change_is_picked_up_without_restart(sim_factory: Callable[..., SimHandle],
                                                             redis_db_url: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.ingest import ingest_orderbook

    sim = sim_factory(markets="BTC-EUR,ETH-EUR,XRP-EUR", book_rate=30)
    ingest_env(monkeypatch, sim, redis_db_url, tmp_path, markets=None)
    client = redis.Redis.from_url(redis_db_url, decode_responses=True)
    try:
        client.hset(KEY_UNIVERSE, "BTC-EUR", '{"score":"1","reasons":[],"since":0}')
        run = asyncio.create_task(ingest_orderbook(duration_s=9, metrics_port=0, universe_poll_s=1.0))
        await asyncio.sleep(3.0)
        client.hset(KEY_UNIVERSE, "XRP-EUR", '{"score":"1","reasons":[],"since":0}')
        client.hdel(KEY_UNIVERSE, "BTC-EUR")
        changed_at = now_ms()
        summary = await run
        entries = [fields for _id, fields in client.xrange(STREAM_BOOK)]
    finally:
        client.close()
    assert summary["markets"] == ("XRP-EUR",) and summary["market_source"] == KEY_UNIVERSE
    xrp = [int(e["recv_ts"]) for e in entries if e["market"] == "XRP-EUR"]
    btc = [int(e["recv_ts"]) for e in entries if e["market"] == "BTC-EUR"]
    assert xrp and min(xrp) - changed_at < 60_000          # added within a minute, no restart
    assert btc and max(btc) < changed_at + 3_000           # removed: nothing after the next poll
    assert not any(e["market"] == "ETH-EUR" for e in entries)


async def test_redis_restart_mid_run_loses_nothing_in_the_lake(sim_factory: Callable[..., SimHandle],
                                                              tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.ingest import ingest_orderbook

    server = EmbeddedRedis()
    server.start()
    try:
        sim = sim_factory(markets="BTC-EUR", book_rate=40)
        ingest_env(monkeypatch, sim, server.url, tmp_path, markets="BTC-EUR")
        # After the outage the publisher retries within its backoff cap (5 s): leave it 9 s after the restart.
        run = asyncio.create_task(ingest_orderbook(duration_s=14, metrics_port=0))
        await asyncio.sleep(2.5)
        server.stop()
        await asyncio.sleep(2.0)
        restarted = EmbeddedRedis(port=server.port)
        restarted.start()
        restarted_at = now_ms()
        try:
            summary = await run
            client = redis.Redis(port=server.port, decode_responses=True)
            after = [int(f["recv_ts"]) for _id, f in client.xrange(STREAM_BOOK) if int(f["recv_ts"]) > restarted_at]
            client.close()
        finally:
            restarted.stop()
    finally:
        server.stop()
    updates = lake_rows(tmp_path, "orderbook/update")
    assert summary["stream_batches_failed"] > 0 and after           # Redis was down, then written again
    assert len(updates) == summary["handler"]["applied"]            # the lake has every applied update
    nonces = [int(str(r["nonce"])) for r in updates]
    assert nonces == sorted(nonces) and len(set(nonces)) == len(nonces)


def test_prefect_yaml_deploys_every_ingest_deployment(prefect_api: str, tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "TRADING_APP_DIR": str(REPO_ROOT)}
    prefect = [sys.executable, "-m", "prefect"]
    subprocess.run([*prefect, "work-pool", "create", "local", "--type", "process", "--overwrite"], env=env,
                   cwd=REPO_ROOT, check=True, capture_output=True, timeout=120)
    deploy = subprocess.run([*prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for name in ("ingest-ticker24h", "ingest-orderbook", "ingest-candles"):
            deployment = client.read_deployment_by_name(f"{name}/{name}")
            assert (deployment.work_pool_name, deployment.work_queue_name) == ("local", "trading")
            assert deployment.parameters["duration_s"] == 3540
            assert deployment.schedules[0].schedule.timezone == "Europe/Amsterdam"  # type: ignore[union-attr]
            assert deployment.global_concurrency_limit is not None
            assert deployment.global_concurrency_limit.limit == 1
            assert deployment.concurrency_options is not None
            assert deployment.concurrency_options.collision_strategy == "CANCEL_NEW"
    # Deploying again replaces, it does not duplicate.
    again = subprocess.run([*prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    with get_client(sync_client=True) as client:
        assert len([d for d in client.read_deployments() if d.name.startswith("ingest-")]) == 3


async def test_candles_flow_runs_bounded_with_backfill(sim_factory: Callable[..., SimHandle], redis_db_url: str,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.ingest import ingest_candles

    sim = sim_factory(markets="BTC-EUR,ETH-EUR", book_rate=40)
    ingest_env(monkeypatch, sim, redis_db_url, tmp_path)
    summary = await ingest_candles(duration_s=4, metrics_port=0)
    assert summary["handler"]["events"] > 0 and summary["handler"]["rest_calls"] >= 2   # start backfill
    client = redis.Redis.from_url(redis_db_url, decode_responses=True)
    try:
        entries = [fields for _id, fields in client.xrange("bitvavo:candles:1m")]
    finally:
        client.close()
    assert entries and all(set(e) == {"v", "ts", "recv_ts", "market", "interval", "open_ts", "open", "high", "low",
                                      "close", "volume"} for e in entries)
    assert lake_rows(tmp_path, "candles/1m")
