"""The signal engine loop on a real Redis: scripted `bitvavo:book` entries in, signals out.

Each test runs `run_signal_engine` for a short bounded segment. A new consumer group starts at
"$", so entries are added only once the group exists (`_started`).
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from trading.bus import SIGNAL_SCHEMA, STREAM_BOOK, decode_entry, encode_entry
from trading.clock import now_ms
from trading.config import Settings
from trading.consumer import StreamEntry
from trading.lake import LakeWriteError, LakeWriter, channel_files, read_jsonl, utc_day
from trading.lease import LeaseHeldError
from trading.metrics import sample_value
from trading.processes import free_port
from trading.redis_conn import async_client
from trading.signal_engine import (
    LOOP_NAME,
    WINDOWS_KEY,
    SignalEngine,
    SignalEngineMetrics,
    SignalEngineSummary,
    run_signal_engine,
)
from trading.signals import MarketState, SignalDecision, SignalEvaluator, SignalParams, load_strategy, signal_id_for

SIGNALS = "signals:baseline"
PARAMS = SignalParams(max_spread_bps=Decimal("25"), min_volatility_bps=Decimal("2"), window=3, min_interval_ms=0)
# Mids 100, 101, 100, 101, ... with a 0.02 spread: from the third entry on, every entry is a signal.
QUOTES = [("99.99", "100.01"), ("100.99", "101.01")]



def _book(nonce: int, bid: str, ask: str, *, market: str = "BTC-EUR", ts: int | None = None) -> dict[str, Any]:
    ts = now_ms() if ts is None else ts
    return {"ts": ts, "recv_ts": ts + 1, "market": market, "nonce": nonce, "bid": bid, "bid_size": "0.5",
            "ask": ask, "ask_size": "0.7"}


def _script(first: int, last: int) -> Iterator[dict[str, Any]]:
    for nonce in range(first, last + 1):
        yield _book(nonce, *QUOTES[(nonce - 1) % 2])


class Harness:
    def __init__(self, url: str, lake: Path) -> None:
        self.url = url
        self.lake = lake
        self.settings = Settings(redis_url=url, parquet_dir=lake)
        self.client = async_client(url)

    def start(self, duration_s: float, **kwargs: Any) -> asyncio.Task[SignalEngineSummary]:
        kwargs.setdefault("params", PARAMS)
        kwargs.setdefault("metrics_port", 0)
        return asyncio.create_task(run_signal_engine(self.settings, redis_url=self.url, duration_s=duration_s,
                                                     gauge_interval_s=0.1, block_ms=50, **kwargs))

    async def started(self, task: asyncio.Task[Any], timeout_s: float = 5.0) -> None:
        """Wait until the engine's group exists (new entries after this are read)."""
        async with asyncio.timeout(timeout_s):
            while True:
                assert not task.done(), task
                if await self.client.exists(STREAM_BOOK):
                    groups = await self.client.xinfo_groups(STREAM_BOOK)
                    if any(g["name"] == LOOP_NAME for g in groups):
                        return
                await asyncio.sleep(0.01)

    async def add(self, *entries: dict[str, Any]) -> list[str]:
        return [await self.client.xadd(STREAM_BOOK, encode_entry(e)) for e in entries]

    async def add_raw(self, fields: dict[str, str]) -> str:
        entry_id: str = await self.client.xadd(STREAM_BOOK, fields)
        return entry_id

    async def signals(self) -> list[dict[str, str]]:
        return [fields for _id, fields in await self.client.xrange(SIGNALS)]

    async def wait_signals(self, count: int, timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            while await self.client.xlen(SIGNALS) < count:
                await asyncio.sleep(0.01)

    async def pending(self) -> int:
        return int((await self.client.xpending(STREAM_BOOK, LOOP_NAME))["pending"])

    def lake_rows(self) -> list[dict[str, Any]]:
        return [row for path in channel_files(self.lake, utc_day(now_ms()), "signals") for row in read_jsonl(path)]


@pytest.fixture
async def harness(redis_db_url: str, tmp_path: Path) -> Any:
    h = Harness(redis_db_url, tmp_path / "lake")
    yield h
    await h.client.aclose()


def _expected(entries: list[dict[str, Any]], strategy: str = "baseline",
              params: SignalParams = PARAMS) -> list[dict[str, str]]:
    """What an uninterrupted run must emit: the pure evaluator over the same entries, encoded."""
    evaluator = SignalEvaluator(load_strategy(strategy), params)
    out = []
    for entry in entries:
        signal = evaluator.evaluate(encode_entry(entry), now_ms=entry["ts"]).signal
        if signal is not None:
            out.append(encode_entry(signal))
    return out


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
        return text


async def test_book_entries_in_signals_out_with_the_contract_fields(harness: Harness) -> None:
    # Hours-old history before the group exists: a new group starts at "$" and never sees it.
    await harness.add(_book(900, "1", "2", ts=now_ms() - 3 * 3_600_000))
    port = free_port()
    run = harness.start(2.0, metrics_port=port)
    await harness.started(run)
    entries = [_book(1, "99.99", "100.01"), _book(2, "100.99", "101.01"), _book(3, "99.99", "100.01")]
    await harness.add(*entries)
    await harness.wait_signals(1)
    await asyncio.sleep(0.3)  # a gauge refresh (every 0.1 s) after the last ack
    page = await asyncio.to_thread(_fetch, f"http://127.0.0.1:{port}/metrics")
    summary = await run

    assert await harness.signals() == [{
        "v": "1", "ts": str(entries[2]["ts"]), "signal_id": signal_id_for("baseline", "BTC-EUR", 3),
        "market": "BTC-EUR", "side": "buy", "strength": "0.3339",
        "reason": "mean-reversion: mid -33.2226 bps from the 3-sample mean; spread 2 <= 25 bps; vol 99.5033 >= 2 bps",
        "ref_price": "100", "spread_bps": "2", "volatility": "99.5033", "strategy": "baseline"}]
    decoded = decode_entry((await harness.signals())[0], SIGNAL_SCHEMA)
    assert decoded["strength"] == Decimal("0.3339") and decoded["ref_price"] == Decimal("100")
    lake = harness.lake_rows()
    assert [row["signal_id"] for row in lake] == [signal_id_for("baseline", "BTC-EUR", 3)]
    assert lake[0]["volatility"] == "99.5033" and lake[0]["ts"] == entries[2]["ts"]

    assert summary.evaluated == 3 and summary.signals == 1 and summary.signals_by_side == {"buy": 1}
    assert summary.outcomes == {"quiet": 2, "signal": 1}
    assert summary.markets == ["BTC-EUR"] and summary.lake_rows == 1 and summary.fencing_token >= 1
    assert await harness.pending() == 0
    assert "BTC-EUR" in await harness.client.hgetall(WINDOWS_KEY)

    for family, kind in [("book_entries_total", "counter"), ("signals_total", "counter"),
                         ("rejects_total", "counter"), ("window_resets_total", "counter"),
                         ("spread_bps", "gauge"), ("volatility_bps", "gauge"),
                         ("processing_seconds", "histogram"), ("entry_age_seconds", "histogram"),
                         ("consumed_total", "counter"), ("dead_letters_total", "counter"),
                         ("pending", "gauge"), ("consumer_lag", "gauge")]:
        assert f"# TYPE trader_signal_engine_{family} {kind}\n" in page, family
    for sample in ['trader_signal_engine_signals_total{market="BTC-EUR",side="buy"} 1.0',
                   'trader_signal_engine_book_entries_total{market="BTC-EUR",outcome="quiet"} 2.0',
                   'trader_signal_engine_spread_bps{market="BTC-EUR"} 2.0',
                   'trader_signal_engine_volatility_bps{market="BTC-EUR"} 99.5033',
                   'trader_signal_engine_consumed_total{stream="bitvavo:book"} 3.0',
                   'trader_signal_engine_pending{stream="bitvavo:book"} 0.0',
                   'trader_signal_engine_consumer_lag{stream="bitvavo:book"} 0.0',
                   'trader_signal_engine_processing_seconds_count 3.0']:
        assert sample + "\n" in page, sample


async def test_bad_entries_go_to_the_dead_letter_stream_and_the_loop_goes_on(harness: Harness) -> None:
    metrics = SignalEngineMetrics()
    run = harness.start(1.5, metrics=metrics, markets=["BTC-EUR", "ETH-EUR"])
    await harness.started(run)
    good = list(_script(1, 3))
    base = encode_entry(_book(50, "99", "100"))
    bad = {
        "missing_field": {k: v for k, v in base.items() if k != "bid_size"},
        "malformed": {**base, "ask": "12,5"},
        "bad_price": {**base, "bid": "-99"},
        "crossed": {**base, "bid": "101"},
        "unknown_market": {**base, "market": "DOGE-EUR"},
    }
    await harness.add(good[0])
    bad_ids = {kind: await harness.add_raw(fields) for kind, fields in bad.items()}
    await harness.add(good[1], {**good[1]}, good[2])  # the duplicate of nonce 2 is skipped, not dead
    nan_id = await harness.add_raw({**base, "bid": "NaN"})
    summary = await run

    dead = [decode_entry(fields) for _id, fields in await harness.client.xrange(STREAM_BOOK + ":dead")]
    assert [d["source_id"] for d in dead] == [*bad_ids.values(), nan_id]
    assert all(d["cause"] == "rejected" and d["group"] == LOOP_NAME for d in dead)
    reasons = [d["reason"] for d in dead]
    assert reasons[:5] == ["missing field 'bid_size' (bid and bid_size come together)",
                           "ask is not a decimal: '12,5'",
                           "field 'bid' must be positive, got '-99'",
                           "crossed book: bid 101 >= ask 100",
                           "unknown market 'DOGE-EUR': not one of the configured markets"]
    assert reasons[5] == "bid must be finite, got 'NaN'"
    assert orjson.loads(dead[1]["fields"])["ask"] == "12,5"  # the entry is kept verbatim

    assert [s["signal_id"] for s in await harness.signals()] == [signal_id_for("baseline", "BTC-EUR", 3)]
    assert summary.rejected == {"missing_field": 1, "malformed": 2, "bad_price": 1, "crossed": 1,
                                "unknown_market": 1}
    assert summary.dead_lettered == 6 and summary.outcomes == {"quiet": 2, "duplicate": 1, "signal": 1}
    assert sample_value(metrics.registry, "trader_signal_engine_rejects_total", {"reason": "malformed"}) == 2
    assert sample_value(metrics.registry, "trader_signal_engine_dead_letters_total",
                        {"stream": STREAM_BOOK, "cause": "rejected"}) == 6
    assert sample_value(metrics.registry, "trader_signal_engine_book_entries_total",
                        {"market": "BTC-EUR", "outcome": "duplicate"}) == 1
    assert await harness.pending() == 0


async def test_a_crash_between_read_and_ack_is_processed_once_after_restart(harness: Harness) -> None:
    first = harness.start(1.2)
    await harness.started(first)
    before_crash = list(_script(1, 4))
    await harness.add(*before_crash)
    assert (await first).signals == 2  # nonces 3 and 4

    # An instance read nonces 5 and 6 and died before its transactions committed.
    in_flight = list(_script(5, 6))
    await harness.add(*in_flight)
    read = await harness.client.xreadgroup(LOOP_NAME, "crashed-instance", {STREAM_BOOK: ">"}, count=10)
    assert len(read[0][1]) == 2 and await harness.pending() == 2

    second = harness.start(1.2)
    await harness.started(second)
    replayed = {**in_flight[1]}  # ingest publishing nonce 6 again: skipped, no second signal
    await harness.add(replayed)
    summary = await second

    assert summary.reclaimed == 2 and summary.signals == 2
    assert summary.outcomes == {"signal": 2, "duplicate": 1}
    # Two samples alone cannot fill a window of 3: the signals of 5 and 6 come from the window the
    # first instance committed with its last ack, exactly as in an uninterrupted run.
    assert await harness.signals() == _expected(before_crash + in_flight)
    ids = [s["signal_id"] for s in await harness.signals()]
    assert ids == [signal_id_for("baseline", "BTC-EUR", n) for n in (3, 4, 5, 6)]
    assert [row["signal_id"] for row in harness.lake_rows()] == ids
    assert await harness.pending() == 0


async def test_a_second_instance_is_blocked_by_the_lease(harness: Harness) -> None:
    port = free_port()
    first = harness.start(1.5, metrics_port=port)
    await harness.started(first)
    # Same metrics port: the second instance must fail on the lease before it binds anything.
    with pytest.raises(LeaseHeldError, match="lease 'signal-engine' is held by"):
        await run_signal_engine(harness.settings, redis_url=harness.url, duration_s=1.0, metrics_port=port,
                                params=PARAMS)
    await harness.add(*_script(1, 3))
    summary = await first
    assert summary.signals == 1
    assert len(await harness.signals()) == 1


async def test_an_entry_whose_transaction_did_not_commit_is_evaluated_again(harness: Harness) -> None:
    evaluator = SignalEvaluator(load_strategy("baseline"), PARAMS)
    with LakeWriter(harness.lake, "signals") as lake:
        engine = SignalEngine(harness.settings, harness.client, evaluator, lake, SignalEngineMetrics())
        entries = [StreamEntry(STREAM_BOOK, f"{n}-0", encode_entry(e), 1) for n, e in enumerate(_script(1, 3), 1)]
        for entry in entries[:2]:
            async with harness.client.pipeline(transaction=True) as tx:
                await engine.handle(entry, tx)
                await tx.execute()
        async with harness.client.pipeline(transaction=True) as tx:
            await engine.handle(entries[2], tx)  # queued; Redis went away before EXEC
        async with harness.client.pipeline(transaction=True) as tx:
            await engine.handle(entries[2], tx)  # the consumer hands the same entry back
            await tx.execute()
    # Evaluated again from the window before it (not skipped as a duplicate of itself).
    assert [s["signal_id"] for s in await harness.signals()] == [signal_id_for("baseline", "BTC-EUR", 3)]
    # The lake row was written before each attempt's EXEC: readers dedupe on signal_id.
    assert [row["signal_id"] for row in harness.lake_rows()] == [signal_id_for("baseline", "BTC-EUR", 3)] * 2


def always_sell(state: MarketState, params: SignalParams) -> SignalDecision | None:
    """A user's strategy, named by its dotted path: sell every entry once two samples exist."""
    if state.sample_count < 2:
        return None
    return SignalDecision("sell", Decimal(params.options.get("strength", "0.25")), f"test: {state.sample_count}")


async def test_a_custom_strategy_is_plugged_in_by_its_dotted_path(harness: Harness) -> None:
    spec = "tests.integration.test_signal_engine:always_sell"
    run = harness.start(1.0, strategy=spec, params=SignalParams(
        max_spread_bps=Decimal("25"), min_volatility_bps=Decimal("2"), window=3, min_interval_ms=0,
        options={"strength": "0.75"}))
    await harness.started(run)
    await harness.add(*_script(1, 3))
    summary = await run
    signals = await harness.signals()
    assert [(s["side"], s["strength"], s["reason"], s["strategy"]) for s in signals] == [
        ("sell", "0.75", "test: 2", spec), ("sell", "0.75", "test: 3", spec)]
    assert [s["signal_id"] for s in signals] == [signal_id_for(spec, "BTC-EUR", n) for n in (2, 3)]
    assert summary.strategy == spec


async def test_a_lake_failure_stops_the_loop_and_leaves_the_entry_pending(harness: Harness, tmp_path: Path) -> None:
    blocked = tmp_path / "lake-is-a-file"
    blocked.write_text("not a directory")
    harness.settings = Settings(redis_url=harness.url, parquet_dir=blocked)
    run = harness.start(10.0)
    await harness.started(run)
    await harness.add(*_script(1, 3))
    with pytest.raises(LakeWriteError, match="cannot create the partition directory"):
        async with asyncio.timeout(5):
            await run
    assert await harness.signals() == []  # nothing published that the lake does not have
    pending = await harness.client.xpending_range(STREAM_BOOK, LOOP_NAME, min="-", max="+", count=10)
    assert len(pending) == 1  # nonce 3, the one whose signal could not be recorded
    assert await harness.client.exists(f"lease:{LOOP_NAME}") == 0  # released on the way out

