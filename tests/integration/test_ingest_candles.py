"""Candle ingest (no Prefect) against the simulator and a real Redis: contract rows, lake, REST backfill, ledger."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
import redis

from tests.integration.conftest import SimHandle
from trading.bus import stream_candles
from trading.clock import now_ms
from trading.config import Settings
from trading.exchange.governor import RateGovernor
from trading.exchange.models import Candle
from trading.exchange.rest import BitvavoRest
from trading.gaps import GapKind, GapLedger, GapRecord
from trading.ingest.candles import CandlesIngest, bucket_start, empty_runs
from trading.ingest.runner import run_ingest
from trading.lake import channel_files, read_jsonl, utc_day

MARKETS = "BTC-EUR,ETH-EUR"
MINUTE = 60_000
CANDLE_FIELDS = {"v", "ts", "recv_ts", "market", "interval", "open_ts", "open", "high", "low", "close", "volume"}


def settings_for(sim: SimHandle, redis_url: str, lake: Path) -> Settings:
    return Settings.from_env({"INGEST_MARKETS": MARKETS, "PARQUET_DIR": str(lake), "REDIS_URL": redis_url,
                              "BITVAVO_REST_URL": sim.rest_url, "BITVAVO_WS_URL": sim.ws_url})


def stream_entries(redis_url: str, stream: str) -> list[dict[str, str]]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return [dict(fields) for _id, fields in client.xrange(stream)]
    finally:
        client.close()


def record_candle_requests(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Every REST candles request the handler makes, as (market, start_ms, end_ms)."""
    calls: list[tuple[str, int, int]] = []
    original = BitvavoRest.candles

    def recording(self: BitvavoRest, market: str, interval: str, *, limit: int | None = None,
                  start_ms: int | None = None, end_ms: int | None = None) -> list[Candle]:
        assert start_ms is not None and end_ms is not None, "backfill requests are always bounded"
        calls.append((market, start_ms, end_ms))
        return original(self, market, interval, limit=limit, start_ms=start_ms, end_ms=end_ms)

    monkeypatch.setattr(BitvavoRest, "candles", recording)
    return calls


async def test_live_candles_reach_the_streams_and_the_lake_with_exactly_the_contract_fields(
        sim_factory: Callable[..., SimHandle], redis_db_url: str, tmp_path: Path) -> None:
    sim = sim_factory(markets=MARKETS, book_rate=50)
    settings = settings_for(sim, redis_db_url, tmp_path)
    summary = await run_ingest(CandlesIngest(intervals=("1m", "5m")), settings, redis_url=redis_db_url,
                               duration_s=4)
    assert summary.handler["events"] > 10 and summary.handler["rejected"] == 0
    for interval in ("1m", "5m"):
        entries = stream_entries(redis_db_url, stream_candles(interval))
        assert {e["market"] for e in entries} == set(MARKETS.split(","))
        for entry in entries:
            assert set(entry) == CANDLE_FIELDS
            assert entry["interval"] == interval and entry["ts"] == entry["open_ts"]
            assert int(entry["open_ts"]) % (MINUTE if interval == "1m" else 5 * MINUTE) == 0
            low, high = Decimal(entry["low"]), Decimal(entry["high"])
            assert low <= min(Decimal(entry["open"]), Decimal(entry["close"])) <= high
        files = channel_files(tmp_path, utc_day(now_ms()), f"candles/{interval}")
        assert files and all(path.parent == tmp_path / utc_day(now_ms()).isoformat() / "candles" / interval
                             for path in files)
        rows = [row for path in files for row in read_jsonl(path)]
        assert len(rows) == len(entries) and all(set(row) == CANDLE_FIELDS for row in rows)


async def test_reconnect_windows_land_in_every_interval_ledger(sim_factory: Callable[..., SimHandle],
                                                               redis_db_url: str, tmp_path: Path) -> None:
    sim = sim_factory(markets=MARKETS, book_rate=50)
    settings = settings_for(sim, redis_db_url, tmp_path)
    run = asyncio.create_task(run_ingest(CandlesIngest(intervals=("1m", "5m")), settings, redis_url=redis_db_url,
                                         duration_s=4))
    await asyncio.sleep(1.5)
    sim.drop_connections()
    summary = await run
    assert summary.reconnects == 1 and summary.handler["events"] > 0
    ledger = GapLedger(tmp_path)
    try:
        for interval in ("1m", "5m"):
            kinds = [r.kind for r in ledger.read(utc_day(now_ms()), f"candles/{interval}")]
            assert kinds.count(GapKind.RECONNECT) == 1
    finally:
        ledger.close()


async def test_backfill_fetches_what_the_socket_missed_and_never_refetches_known_empty_buckets(
        sim_factory: Callable[..., SimHandle], redis_db_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    sim = sim_factory("--history-minutes", "0", markets=MARKETS, book_rate=20)  # a market with no past
    sim.pause_feed()
    sim.step(300)  # trades now, in bucket `traded` (or the one before, had a minute just turned)
    traded = bucket_start(now_ms(), MINUTE)
    # Run the handler's exchange clock 5 s past the end of `traded` plus its 5 s settle time: the
    # bucket counts as closed without waiting a minute. The socket sends nothing (feed paused), and
    # the simulator has no candles from before it started: those buckets are genuinely empty.
    skew = traded + MINUTE + 10_000 - now_ms()

    def exchange_clock() -> int:
        return now_ms() + skew

    window = (traded + MINUTE - 10 * MINUTE, traded + MINUTE)
    rest = BitvavoRest(sim.rest_url, governor=RateGovernor())
    truth = {m: await asyncio.to_thread(rest.candles, m, "1m", start_ms=window[0], end_ms=window[1])
             for m in MARKETS.split(",")}
    assert all(truth.values()), "step(300) must have traded in every market"
    calls = record_candle_requests(monkeypatch)
    settings = settings_for(sim, redis_db_url, tmp_path)

    first = await run_ingest(CandlesIngest(intervals=("1m",), backfill_buckets=10, clock_ms=exchange_clock),
                             settings, redis_url=redis_db_url, duration_s=2.5)
    assert first.handler["events"] == 0  # everything below came over REST
    assert sorted(calls) == [(m, *window) for m in MARKETS.split(",")]
    entries = stream_entries(redis_db_url, stream_candles("1m"))
    assert all(set(e) == CANDLE_FIELDS for e in entries)
    ledger = GapLedger(tmp_path)
    known: dict[str, list[tuple[int, int]]] = {}
    try:
        for market, candles in truth.items():
            got = [e for e in entries if e["market"] == market]
            assert [(int(e["open_ts"]), Decimal(e["open"]), Decimal(e["high"]), Decimal(e["low"]),
                     Decimal(e["close"]), Decimal(e["volume"])) for e in got] == [
                (c.open_ts, c.open, c.high, c.low, c.close, c.volume) for c in sorted(candles, key=_open_ts)]
            # Every other bucket of the window is known empty, consecutive buckets in one record.
            expected = [part for start, end in empty_runs(*window, MINUTE, {c.open_ts for c in candles}, [])
                        for part in GapRecord(GapKind.CANDLE_KNOWN_EMPTY, "candles/1m", start, end).split_at_midnight()]
            records = [r for r in _ledger_records(ledger, window) if r.market == market]
            assert [(r.kind, r.start_ts, r.end_ts) for r in records] == [
                (part.kind, part.start_ts, part.end_ts) for part in expected]
            known[market] = ledger.known_empty("candles/1m", market, *window)
    finally:
        ledger.close()
    assert first.handler["known_empty_buckets"] == sum(
        (end - start) // MINUTE for runs in known.values() for start, end in runs) >= 2 * 8

    # A restart over the same window asks only for buckets that had candles.
    calls.clear()
    second = await run_ingest(CandlesIngest(intervals=("1m",), backfill_buckets=10, clock_ms=exchange_clock),
                              settings, redis_url=redis_db_url, duration_s=2)
    assert second.handler["known_empty_buckets"] == 0
    assert second.handler["backfilled"] == sum(len(candles) for candles in truth.values())
    assert sorted(calls) == [(m, min(c.open_ts for c in truth[m]), window[1]) for m in MARKETS.split(",")]
    for market, start, end in calls:
        assert not any(start < empty_end and empty_start < end for empty_start, empty_end in known[market])


def _open_ts(candle: Candle) -> int:
    return candle.open_ts


def _ledger_records(ledger: GapLedger, window: tuple[int, int]) -> list[GapRecord]:
    days = sorted({utc_day(window[0]), utc_day(window[1] - 1)})
    return [r for day in days for r in ledger.read(day, "candles/1m")]
