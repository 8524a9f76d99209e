"""Ingest loops (no Prefect) against the simulator and a real Redis: streams, lake, ledger, lease."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.integration.conftest import SimHandle
from trading.bus import STREAM_BOOK, STREAM_ORDERBOOK_UPDATE, STREAM_TICKER24H
from trading.clock import now_ms
from trading.config import Settings
from trading.exchange.governor import RateGovernor
from trading.exchange.rest import BitvavoRest
from trading.gaps import GapKind, GapLedger
from trading.ingest.orderbook import OrderbookIngest
from trading.ingest.runner import run_ingest
from trading.ingest.ticker24h import Ticker24hIngest
from trading.lake import channel_files, read_jsonl, utc_day
from trading.lease import LeaseHeldError

BOOK_FIELDS = {"v", "ts", "recv_ts", "market", "nonce", "bid", "bid_size", "ask", "ask_size"}
UPDATE_FIELDS = {"v", "ts", "recv_ts", "market", "nonce", "bids", "asks"}
TICKER_FIELDS = {"v", "ts", "recv_ts", "market", "open", "high", "low", "last", "volume", "volumeQuote", "bid",
                 "bidSize", "ask", "askSize"}
MARKETS = "BTC-EUR,ETH-EUR"


def settings_for(sim: SimHandle, redis_url: str, lake: Path, **extra: str) -> Settings:
    return Settings.from_env({"INGEST_MARKETS": MARKETS, "PARQUET_DIR": str(lake), "REDIS_URL": redis_url,
                              "BITVAVO_REST_URL": sim.rest_url, "BITVAVO_WS_URL": sim.ws_url, **extra})


def lake_rows(lake: Path, channel: str) -> list[dict[str, Any]]:
    return [row for path in channel_files(lake, utc_day(now_ms()), channel) for row in read_jsonl(path)]


def last_entry(client: redis.Redis, stream: str, market: str) -> dict[str, str]:
    for _id, fields in client.xrevrange(stream, count=5000):
        if fields["market"] == market:
            return dict(fields)
    raise AssertionError(f"no {stream} entry for {market}")


async def test_orderbook_ingest_streams_lake_and_top_of_book(sim_factory: Callable[..., SimHandle],
                                                             redis_db_url: str, tmp_path: Path) -> None:
    sim = sim_factory(markets=MARKETS, book_rate=50)
    settings = settings_for(sim, redis_db_url, tmp_path)
    run = asyncio.create_task(run_ingest(OrderbookIngest(), settings, redis_url=redis_db_url, duration_s=6))
    await asyncio.sleep(3.5)
    sim.pause_feed()
    await asyncio.sleep(1.0)
    rest = BitvavoRest(sim.rest_url, governor=RateGovernor())
    snapshots = {m: await asyncio.to_thread(rest.book, m, 5) for m in MARKETS.split(",")}
    summary = await run
    sim.resume_feed()
    assert summary.handler["applied"] > 100 and summary.handler["parse_errors"] == 0
    client = redis.Redis.from_url(redis_db_url, decode_responses=True)
    try:
        for market, snapshot in snapshots.items():
            top = last_entry(client, STREAM_BOOK, market)
            assert set(top) == BOOK_FIELDS
            assert int(top["nonce"]) == snapshot.nonce
            assert (Decimal(top["bid"]), Decimal(top["bid_size"])) == snapshot.bids[0]
            assert (Decimal(top["ask"]), Decimal(top["ask_size"])) == snapshot.asks[0]
            assert set(last_entry(client, STREAM_ORDERBOOK_UPDATE, market)) == UPDATE_FIELDS
    finally:
        client.close()
    updates = lake_rows(tmp_path, "orderbook/update")
    tops = lake_rows(tmp_path, "orderbook/top")
    assert len(updates) == len(tops) == summary.handler["applied"]
    snapshots = lake_rows(tmp_path, "orderbook/snapshot")
    assert {r["reason"] for r in snapshots} == {"start"}
    assert all(r["recv_ts"] >= r["ts"] - 5_000 for r in tops)
    for market in MARKETS.split(","):
        # No hole: the updates continue the start snapshot nonce by nonce, buffered ones included.
        start = next(int(str(r["nonce"])) for r in snapshots if r["market"] == market)
        nonces = [int(str(r["nonce"])) for r in updates if r["market"] == market]
        assert nonces == list(range(start + 1, start + 1 + len(nonces)))


async def test_gaps_and_reconnects_land_in_the_ledger_and_the_book_heals(sim_factory: Callable[..., SimHandle],
                                                                         redis_db_url: str, tmp_path: Path) -> None:
    sim = sim_factory(markets=MARKETS, book_rate=50)
    settings = settings_for(sim, redis_db_url, tmp_path)
    handler = OrderbookIngest()
    run = asyncio.create_task(run_ingest(handler, settings, redis_url=redis_db_url, duration_s=8))
    await asyncio.sleep(2.0)
    sim.skip_nonce("BTC-EUR")
    await asyncio.sleep(1.5)
    sim.drop_connections()
    await asyncio.sleep(2.0)
    sim.skip_nonce("ETH-EUR")
    await asyncio.sleep(1.5)
    sim.pause_feed()
    await asyncio.sleep(0.7)
    rest = BitvavoRest(sim.rest_url, governor=RateGovernor())
    snapshots = {m: await asyncio.to_thread(rest.book, m) for m in MARKETS.split(",")}
    summary = await run
    sim.resume_feed()
    for market, snapshot in snapshots.items():
        book = handler.books.syncs[market].book
        assert book.nonce == snapshot.nonce and book.bids() == snapshot.bids and book.asks() == snapshot.asks
    ledger = GapLedger(tmp_path)
    records = ledger.read(utc_day(now_ms()), "orderbook/update")
    ledger.close()
    kinds = [(r.kind, r.market) for r in records]
    assert (GapKind.NONCE_GAP, "BTC-EUR") in kinds and (GapKind.NONCE_GAP, "ETH-EUR") in kinds
    assert (GapKind.RESYNC, "BTC-EUR") in kinds and (GapKind.RESYNC, "ETH-EUR") in kinds
    assert (GapKind.RECONNECT, None) in kinds
    assert summary.reconnects == 1 and summary.handler["resyncs"] == 2
    assert {r["reason"] for r in lake_rows(tmp_path, "orderbook/snapshot")} >= {"start", "resync"}


async def test_ticker24h_ingest_writes_contract_rows(sim_factory: Callable[..., SimHandle], redis_db_url: str,
                                                     tmp_path: Path) -> None:
    sim = sim_factory(markets=MARKETS, book_rate=20)
    settings = settings_for(sim, redis_db_url, tmp_path)
    summary = await run_ingest(Ticker24hIngest(), settings, redis_url=redis_db_url, duration_s=3.5)
    assert summary.handler["rows"] >= 2 and summary.handler["rejected"] == 0
    client = redis.Redis.from_url(redis_db_url, decode_responses=True)
    try:
        entries = [fields for _id, fields in client.xrange(STREAM_TICKER24H)]
    finally:
        client.close()
    assert {e["market"] for e in entries} == set(MARKETS.split(","))
    assert all(set(e) == TICKER_FIELDS for e in entries)
    assert all(Decimal(e["volumeQuote"]) >= 0 for e in entries)
    assert len(lake_rows(tmp_path, "ticker24h")) == len(entries)


async def test_second_instance_does_not_ingest_while_the_first_holds_the_lease(
        sim_factory: Callable[..., SimHandle], redis_db_url: str, tmp_path: Path) -> None:
    sim = sim_factory(markets=MARKETS, book_rate=20)
    settings = settings_for(sim, redis_db_url, tmp_path)
    first = asyncio.create_task(run_ingest(Ticker24hIngest(), settings, redis_url=redis_db_url, duration_s=4))
    await asyncio.sleep(1.0)
    with pytest.raises(LeaseHeldError, match="ingest:ticker24h"):
        await run_ingest(Ticker24hIngest(), settings, redis_url=redis_db_url, duration_s=1, lease_wait_s=0.5)
    summary = await first
    assert summary.handler["rows"] > 0
    # Once released, the next instance gets in with a higher fencing token.
    second = await run_ingest(Ticker24hIngest(), settings, redis_url=redis_db_url, duration_s=1)
    assert second.fencing_token > summary.fencing_token


async def test_metrics_endpoint_serves_the_ingest_families(sim_factory: Callable[..., SimHandle],
                                                           redis_db_url: str, tmp_path: Path) -> None:
    sim = sim_factory(markets=MARKETS, book_rate=40)
    settings = settings_for(sim, redis_db_url, tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = asyncio.create_task(run_ingest(OrderbookIngest(), settings, redis_url=redis_db_url, duration_s=5,
                                         metrics_port=port, gauge_interval_s=0.5))
    await asyncio.sleep(2.0)
    sim.skip_nonce("BTC-EUR")
    await asyncio.sleep(1.5)
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                                  timeout=5).read().decode())
    await run
    for family in ("ingest_messages_total", "ingest_lag_seconds_bucket", "ingest_stream_length",
                   "ingest_last_message_age_seconds", "ingest_redis_up", "ingest_rate_limit_remaining",
                   "ingest_gaps_total", "ingest_resyncs_total"):
        assert family in text, family
    assert 'ingest_stream_length{stream="bitvavo:book"}' in text
    assert 'ingest_gaps_total{channel="orderbook/update",kind="nonce_gap",market="BTC-EUR"} 1.0' in text
    assert "ingest_redis_up 1.0" in text
