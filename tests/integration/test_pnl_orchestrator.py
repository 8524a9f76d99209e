"""The PnL loop on a real Redis: executions in, `trading:pnl:<mode>` out, marks, restarts, rebuilds, bad input,
metrics, anomalies, and the hand-off of open intents.

The fills are the hand-computed script of tests/unit/test_pnl.py, moved to yesterday and today
(UTC) so that `realized_today` is live.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio
from prometheus_client import CollectorRegistry

from tests.unit.test_pnl import EXPECTED_DAY2, SCRIPT, ms
from trading.bus import (
    KEY_OPEN_INTENTS,
    KEY_PNL_LIVE,
    KEY_PNL_PAPER,
    ORDERS_EXECUTED,
    SCHEMA_VERSION,
    STREAM_BOOK,
    decode_entry,
    encode_entry,
)
from trading.clock import now_ms
from trading.config import Settings
from trading.consumer import ConsumerMetrics, GroupConsumer
from trading.events import read_events
from trading.lake import DAY_MS, LakeWriter, channel_files, read_jsonl, utc_day
from trading.maintenance.compaction import compact_lake
from trading.orders import ExecutionReport
from trading.pnl import Ledgers
from trading.pnl_orchestrator import ledger_fields, main, rebuild_from_lake, rebuild_from_stream, run_pnl
from trading.processes import free_port
from trading.redis_conn import async_client

TODAY_MS = now_ms() // DAY_MS * DAY_MS
SHIFT_MS = TODAY_MS - ms("2026-09-23T00:00:00")  # the script's day 2 becomes today
TODAY = utc_day(TODAY_MS)
YESTERDAY = TODAY - timedelta(days=1)


def retimed(report: ExecutionReport) -> ExecutionReport:
    return dataclasses.replace(report, ts=report.ts + SHIFT_MS,
                               fills=tuple(dataclasses.replace(f, ts=f.ts + SHIFT_MS) for f in report.fills))


REPORTS = [retimed(r) for r in SCRIPT]


def expected_hash(live: dict[str, str], **changes: str) -> dict[str, str]:
    """The hand-computed hash; `day`, `updated_ts` (and so `realized_today`) are whatever time the loop wrote it."""
    expected = {**EXPECTED_DAY2, **changes, "day": live["day"], "updated_ts": live["updated_ts"]}
    if live["day"] != TODAY.isoformat():  # the test ran across midnight UTC: no fill of the new day yet
        expected["realized_today"] = "0"
    return expected


def lake_row(report: ExecutionReport) -> dict[str, Any]:
    """What the executor records in the lake (trading/execution/executor.py): the stream fields."""
    return {**report.encode(), "v": SCHEMA_VERSION, "ts": report.ts}


async def execute(client: Any, *reports: ExecutionReport, lake: LakeWriter | None = None) -> None:
    for report in reports:
        await client.xadd(ORDERS_EXECUTED, report.encode())
        if lake is not None:
            lake.write_batch([lake_row(report)])


async def book(client: Any, market: str, bid: str, ask: str) -> None:
    await client.xadd(STREAM_BOOK, encode_entry({"ts": now_ms(), "recv_ts": now_ms(), "market": market, "nonce": 1,
                                                 "bid": Decimal(bid), "bid_size": Decimal(1), "ask": Decimal(ask),
                                                 "ask_size": Decimal(1)}))


async def wait_for(check: Callable[[], Awaitable[bool]], timeout_s: float = 8.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.02)


def start(settings: Settings, url: str, **kwargs: Any) -> asyncio.Task[dict[str, Any]]:
    kwargs.setdefault("metrics_port", 0)
    return asyncio.create_task(run_pnl(settings, redis_url=url, snapshot_every_s=kwargs.pop("snapshot_every_s", 60),
                                       mark_every_s=0.05, gauge_every_s=0.1, block_ms=50, **kwargs))


async def stop(task: asyncio.Task[dict[str, Any]]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task



async def pnl(client: Any, key: str = KEY_PNL_PAPER) -> dict[str, str]:
    return dict(await client.hgetall(key))


async def test_executions_and_marks_give_the_hand_computed_pnl_and_rebuilds_agree(redis_db_url: str,
                                                                                   tmp_path: Path) -> None:
    client = async_client(redis_db_url)
    settings = Settings(parquet_dir=tmp_path)
    executed_lake = LakeWriter(tmp_path, "orders/executed")
    port = free_port()
    await execute(client, *REPORTS[:4], lake=executed_lake)  # recorded before the loop starts: replayed
    task = start(settings, redis_db_url, metrics_port=port)
    try:
        async def replayed() -> bool:
            return (await pnl(client)).get("fills") == "5"

        await wait_for(replayed)
        await book(client, "BTC-EUR", "27490", "27510")  # mid 27500
        await execute(client, *REPORTS[4:], lake=executed_lake)  # arrive while it runs

        async def all_booked_and_marked() -> bool:
            live = await pnl(client)
            return live.get("fills") == "9" and live.get("BTC-EUR:mark") == "27500"

        await wait_for(all_booked_and_marked)
        live = await pnl(client)
        assert live == expected_hash(live)
        anomalies = [e for e in await read_events(client) if e["type"] == "ledger_anomaly"]
        assert [e["detail"]["unbooked"] for e in anomalies] == ["0.1", "0.1"]  # F4 and F5, each once

        # A book for ETH replaces its last-fill stand-in mark (see the unit test for the working).
        await book(client, "ETH-EUR", "1690", "1710")  # mid 1700

        async def eth_marked() -> bool:
            return (await pnl(client)).get("ETH-EUR:mark_source") == "mid"

        await wait_for(eth_marked)
        live = await pnl(client)
        assert live == expected_hash(live, unrealized="375", unrealized_fifo="375", exposure="9225",
                                     equity="17.75", **{"ETH-EUR:unrealized": "300", "ETH-EUR:unrealized_fifo": "300",
                                                         "ETH-EUR:exposure": "5100", "ETH-EUR:mark": "1700",
                                                         "ETH-EUR:mark_source": "mid"})

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'trader_pnl_equity_eur{mode="paper"} 17.75' in metrics
        assert 'trader_pnl_equity_eur{mode="live"} 0.0' in metrics  # the live book: nothing traded live
        assert 'trader_pnl_position{market="BTC-EUR",mode="paper"} 0.15' in metrics
        assert 'trader_pnl_market_exposure_eur{market="ETH-EUR",mode="paper"} 5100.0' in metrics
        # the five replayed fills are not "applied"; the anomalies are counted when evented: F4's (replayed
        # before its first ack, so evented with that ack) and F5's (nothing held)
        assert 'trader_pnl_fills_applied_total{mode="paper"} 4.0' in metrics
        assert 'trader_pnl_anomalies_total{market="BTC-EUR",mode="paper"} 2.0' in metrics
        assert 'trader_pnl_consumed_total{stream="orders:executed"} 8.0' in metrics
        assert "trader_pnl_last_update_age_seconds" in metrics
        assert 'trader_pnl_pending{stream="orders:executed"} 0.0' in metrics
    finally:
        await stop(task)
        executed_lake.close()

    # Rebuilt from the stream, or from the lake, with the same marks: exactly the held hashes.
    final = await pnl(client)
    from_stream = (await rebuild_from_stream(client)).ledgers
    from_lake = rebuild_from_lake(tmp_path, [YESTERDAY, TODAY]).ledgers
    assert from_stream == from_lake
    assert (from_stream.paper.fills_applied, from_stream.live.fills_applied) == (9, 0)
    empty_live = await pnl(client, KEY_PNL_LIVE)
    assert from_stream.live.snapshot(int(empty_live["updated_ts"])) == empty_live
    # Compaction turns the closed hours into Parquet (and removes the JSONL): the lake still rebuilds the same.
    report = compact_lake(tmp_path, now_ms=now_ms() + 2 * DAY_MS, grace_ms=0, daily_grace_ms=0)
    assert report.of("compacted") and not report.errors
    assert not any(channel_files(tmp_path, day, "orders/executed") for day in (YESTERDAY, TODAY))
    from_compacted = rebuild_from_lake(tmp_path, [YESTERDAY, TODAY]).ledgers
    assert from_compacted == from_stream
    for ledger in (from_stream.paper, from_lake.paper):
        ledger.mark("BTC-EUR", Decimal("27500"))
        ledger.mark("ETH-EUR", Decimal("1700"))
        assert ledger.snapshot(int(final["updated_ts"])) == final
    await client.aclose()


async def test_a_crash_between_read_and_ack_counts_nothing_twice(redis_db_url: str, tmp_path: Path) -> None:
    client = async_client(redis_db_url)
    settings = Settings(parquet_dir=tmp_path)
    await execute(client, *REPORTS[:4])
    first = start(settings, redis_db_url)
    try:
        async def five_fills() -> bool:
            return (await pnl(client)).get("fills") == "5"

        await wait_for(five_fills)
    finally:
        await stop(first)

    # The next two reports are read by an instance that dies before acknowledging them.
    await execute(client, *REPORTS[4:6])
    crashed = GroupConsumer(client, ORDERS_EXECUTED, "pnl", metrics=ConsumerMetrics("x", CollectorRegistry()))
    crashed.consumer = "crashed-instance"
    assert len(await crashed.read_new()) == 2
    assert (await client.xpending(ORDERS_EXECUTED, "pnl"))["pending"] == 2

    restarted = start(settings, redis_db_url, duration_s=3.0, snapshot_every_s=0.2)

    async def seven_fills() -> bool:
        return (await pnl(client)).get("fills") == "7"

    await wait_for(seven_fills)
    # The executor re-sends F6's fill in a later report (e.g. its own restart), then the ETH buys arrive.
    await execute(client, dataclasses.replace(REPORTS[5], intent_id="resent"), *REPORTS[6:])
    summary = await restarted
    live = await pnl(client)
    assert ledger_fields(live) == ledger_fields(expected_hash(live))  # marks: none, so the last fills stand in
    assert (summary["reclaimed"], summary["fills_applied"], summary["duplicate_fills"]) == (2, 2, 1)
    assert summary["pnl"]["paper"]["realized"] == "-298" and summary["pnl"]["paper"]["fees"] == "59.25"
    assert (await client.xpending(ORDERS_EXECUTED, "pnl"))["pending"] == 0

    # Snapshots (a row per mode) went to the lake while it ran and once more at stop: the last is the final state.
    rows = [row for path in channel_files(tmp_path, utc_day(now_ms()), "pnl") for row in read_jsonl(path)]
    assert summary["snapshots"] >= 4
    assert len(rows) == summary["snapshots"] + 2  # and the first instance's snapshot at its stop
    paper_rows = [row for row in rows if row["mode"] == "paper"]
    assert ledger_fields(paper_rows[-1]) == ledger_fields(live)
    assert len(paper_rows) == len(rows) // 2
    await client.aclose()


async def test_bad_entries_are_dead_lettered_and_the_loop_goes_on(redis_db_url: str, tmp_path: Path) -> None:
    client = async_client(redis_db_url)
    good = REPORTS[0].encode()
    fills = orjson.loads(good["fills"])
    bad_entries = {
        "missing field": {k: v for k, v in good.items() if k != "fills"},
        "not a decimal": {**good, "fills": orjson.dumps([{**fills[0], "amount": "abc"}]).decode()},
        "unknown market": {**good, "market": "btc-euro"},
        "negative fill": {**good, "fills": orjson.dumps([{**fills[0], "amount": "-0.5"}]).decode()},
    }
    entries = list(bad_entries.values())
    await client.xadd(ORDERS_EXECUTED, entries[0])
    await client.xadd(ORDERS_EXECUTED, entries[1])
    task = start(Settings(parquet_dir=tmp_path), redis_db_url)
    try:
        await client.xadd(ORDERS_EXECUTED, entries[2])
        await execute(client, REPORTS[0])
        await client.xadd(ORDERS_EXECUTED, entries[3])
        await execute(client, REPORTS[1])

        async def settled() -> bool:
            return bool(await client.xlen(ORDERS_EXECUTED + ":dead") == 4 and (await pnl(client)).get("fills") == "2")

        await wait_for(settled)
    finally:
        await stop(task)
    dead = [decode_entry(fields) for _id, fields in await client.xrange(ORDERS_EXECUTED + ":dead")]
    reasons = [record["reason"] for record in dead]
    assert "execution lacks 'fills'" in reasons[0]
    assert "'abc'" in reasons[1]
    assert "btc-euro" in reasons[2]
    assert "amount and price must be positive" in reasons[3]
    assert [orjson.loads(record["fields"]) for record in dead] == entries  # kept verbatim
    live = await pnl(client)
    # F1 and F2 of the script: pos 0.7495, avg 31000, realised 1 (the base-fee disposal), fees 31.5.
    assert (live["BTC-EUR:position"], live["BTC-EUR:avg_cost"], live["realized"], live["fees"]) == (
        "0.7495", "31000", "1", "31.5")
    await client.aclose()


def test_the_rebuild_command_compares_with_the_live_hash(redis_db_url: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    client = redis.Redis.from_url(redis_db_url, decode_responses=True)
    ledgers = Ledgers()
    live_buy = dataclasses.replace(REPORTS[0], intent_id="live-buy", dry_run=False,
                                   fills=(dataclasses.replace(REPORTS[0].fills[0], fill_id="live-f1"),))
    for report in [*REPORTS, live_buy]:
        client.xadd(ORDERS_EXECUTED, report.encode())
        ledgers.apply(report)
    client.hset(KEY_PNL_PAPER, mapping=ledgers.paper.snapshot(now_ms()))
    client.hset(KEY_PNL_LIVE, mapping=ledgers.live.snapshot(now_ms()))
    monkeypatch.setenv("REDIS_URL", redis_db_url)
    monkeypatch.setenv("PARQUET_DIR", str(tmp_path))
    assert main(["rebuild", "--compare"]) == 0
    out = capsys.readouterr().out
    assert '"realized": "-298"' in out and '"BTC-EUR:position": "0.5"' in out  # paper, and the live buy
    client.hset(KEY_PNL_LIVE, "BTC-EUR:position", "0.04")  # a hash that drifted from the stream
    assert main(["rebuild", "--compare"]) == 1
    assert '"held": "0.04"' in capsys.readouterr().out
    client.close()


async def test_an_oversell_is_an_anomaly_event_and_a_final_report_clears_its_open_intent(
        redis_db_url: str, tmp_path: Path) -> None:
    """A live sell beyond the live position (the paper book holds the coins, the live one does not) books
    nothing but its fee, raises a critical `ledger_anomaly` event, and its final report releases the
    intent from `trading:intents:open` in the same transaction as the booking."""
    client = async_client(redis_db_url)
    paper_buy = REPORTS[0]  # 0.5 BTC bought on paper
    live_sell = dataclasses.replace(REPORTS[2], intent_id="live-sell", dry_run=False,
                                    fills=(dataclasses.replace(REPORTS[2].fills[0], fill_id="live-s1"),))
    await client.hset(KEY_OPEN_INTENTS, mapping={"live-sell": "{}", "unrelated": "{}"})
    await execute(client, paper_buy)
    task = start(Settings(parquet_dir=tmp_path), redis_db_url)
    try:
        await execute(client, live_sell)

        async def booked() -> bool:
            return (await pnl(client, KEY_PNL_LIVE)).get("anomalies") == "1"

        await wait_for(booked)
    finally:
        await stop(task)
    live, paper = await pnl(client, KEY_PNL_LIVE), await pnl(client, KEY_PNL_PAPER)
    assert (live["BTC-EUR:position"], live["BTC-EUR:unbooked"], live["realized"]) == ("0", "0.4", "0")
    assert live["fees"] == "-0.8"  # the rebate of the sell's fill still counts
    assert paper["BTC-EUR:position"] == "0.5"  # the paper book is untouched
    assert await client.hkeys(KEY_OPEN_INTENTS) == ["unrelated"]
    anomalies = [event for event in await read_events(client) if event["type"] == "ledger_anomaly"]
    assert len(anomalies) == 1
    assert (anomalies[0]["severity"], anomalies[0]["market"], anomalies[0]["intent_id"]) == (
        "critical", "BTC-EUR", "live-sell")
    assert anomalies[0]["detail"]["mode"] == "live" and anomalies[0]["detail"]["unbooked"] == "0.4"
    await client.aclose()
