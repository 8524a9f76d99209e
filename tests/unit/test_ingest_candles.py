"""Candle ingest logic without a network: bucket arithmetic, empty runs, the backfill watermark."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from trading.clock import now_ms
from trading.config import Settings
from trading.exchange.governor import RateGovernor
from trading.exchange.models import Candle
from trading.exchange.rest import BitvavoRest
from trading.gaps import GapKind, GapLedger, GapRecord
from trading.ingest.candles import (
    BackfillJob,
    BackfillReply,
    CandlesIngest,
    bucket_start,
    empty_runs,
    request_windows,
    uncovered_span,
)
from trading.ingest.runner import IngestContext
from trading.lake import utc_day
from trading.metrics import IngestMetrics, sample_value

MINUTE = 60_000
T0 = 1_758_672_000_000  # 2025-09-24T00:00:00Z, a bucket start of every interval
CONTRACT_FIELDS = {"v", "ts", "recv_ts", "market", "interval", "open_ts", "open", "high", "low", "close", "volume"}


def candle(open_ts: int, price: str = "100", volume: str = "0.5") -> Candle:
    return Candle.from_wire([open_ts, price, price, price, price, volume])


# pure logic ------------------------------------------------------------------------------------


def test_bucket_start_and_request_windows_respect_the_endpoint_limit() -> None:
    assert bucket_start(T0 + 59_999, MINUTE) == T0
    assert bucket_start(T0 + 7 * MINUTE + 1, 5 * MINUTE) == T0 + 5 * MINUTE
    assert request_windows(T0, T0 + 3000 * MINUTE, MINUTE) == [
        (T0, T0 + 1440 * MINUTE), (T0 + 1440 * MINUTE, T0 + 2880 * MINUTE), (T0 + 2880 * MINUTE, T0 + 3000 * MINUTE)]
    assert request_windows(T0, T0, MINUTE) == []


def test_buckets_missing_from_a_reply_are_merged_into_runs() -> None:
    present = {T0 + 2 * MINUTE, T0 + 5 * MINUTE}
    assert empty_runs(T0, T0 + 7 * MINUTE, MINUTE, present, []) == [
        (T0, T0 + 2 * MINUTE), (T0 + 3 * MINUTE, T0 + 5 * MINUTE), (T0 + 6 * MINUTE, T0 + 7 * MINUTE)]
    assert empty_runs(T0, T0 + 3 * MINUTE, MINUTE, {T0, T0 + MINUTE, T0 + 2 * MINUTE}, []) == []


def test_buckets_already_known_empty_are_not_recorded_twice() -> None:
    known = [(T0, T0 + 2 * MINUTE)]
    assert empty_runs(T0, T0 + 4 * MINUTE, MINUTE, {T0 + 3 * MINUTE}, known) == [(T0 + 2 * MINUTE, T0 + 3 * MINUTE)]


def test_the_requested_span_skips_known_empty_ends_but_not_holes_inside() -> None:
    assert uncovered_span(T0, T0 + 10 * MINUTE, MINUTE, [(T0, T0 + 10 * MINUTE)]) is None
    assert uncovered_span(T0, T0 + 10 * MINUTE, MINUTE, [(T0 - MINUTE, T0 + 4 * MINUTE)]) == (T0 + 4 * MINUTE,
                                                                                             T0 + 10 * MINUTE)
    known = [(T0, T0 + 2 * MINUTE), (T0 + 4 * MINUTE, T0 + 6 * MINUTE), (T0 + 9 * MINUTE, T0 + 10 * MINUTE)]
    assert uncovered_span(T0, T0 + 10 * MINUTE, MINUTE, known) == (T0 + 2 * MINUTE, T0 + 9 * MINUTE)
    assert uncovered_span(T0, T0 + 10 * MINUTE, MINUTE, []) == (T0, T0 + 10 * MINUTE)


def test_only_fixed_length_intervals_are_accepted() -> None:
    with pytest.raises(ValueError, match="intervals"):
        CandlesIngest(intervals=("1m", "1W"))
    with pytest.raises(ValueError, match="backfill_buckets"):
        CandlesIngest(backfill_buckets=-1)


# the handler against fakes -----------------------------------------------------------------------


@dataclass
class FakeWsStats:
    disconnected_at_ms: int = 0
    last_error: str = ""


@dataclass
class FakeWs:
    connected: bool = False
    stats: FakeWsStats = field(default_factory=FakeWsStats)
    subscribed: list[tuple[str, tuple[str, ...], str | None]] = field(default_factory=list)
    unsubscribed: list[tuple[str, tuple[str, ...], str | None]] = field(default_factory=list)

    async def subscribe(self, name: str, markets: tuple[str, ...], interval: str | None = None) -> None:
        self.subscribed.append((name, tuple(markets), interval))

    async def unsubscribe(self, name: str, markets: tuple[str, ...], interval: str | None = None) -> None:
        self.unsubscribed.append((name, tuple(markets), interval))


@dataclass
class FakeSink:
    emitted: list[tuple[str, dict[str, Any], str | None]] = field(default_factory=list)

    def emit(self, lake_channel: str, row: dict[str, Any], stream: str | None = None) -> None:
        self.emitted.append((lake_channel, row, stream))


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@dataclass
class Harness:
    handler: CandlesIngest
    ws: FakeWs
    sink: FakeSink
    ledger: GapLedger
    metrics: IngestMetrics
    clock: Clock


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    clock = Clock(T0 + 30_000)  # half way through bucket T0
    handler = CandlesIngest(intervals=("1m",), backfill_buckets=10, settle_s=5, clock_ms=clock)
    ws, sink, ledger, metrics = FakeWs(), FakeSink(), GapLedger(tmp_path), IngestMetrics()
    handler.attach(IngestContext(Settings(), ws, sink, ledger, metrics, RateGovernor()))  # type: ignore[arg-type]
    yield Harness(handler, ws, sink, ledger, metrics, clock)
    ledger.close()


def rows_of(sink: FakeSink) -> list[dict[str, Any]]:
    return [row for _channel, row, _stream in sink.emitted]


async def test_socket_candles_are_emitted_with_the_contract_fields_and_strings_as_received(harness: Harness) -> None:
    handler, sink = harness.handler, harness.sink
    await handler.set_markets(("BTC-EUR",), ())
    assert harness.ws.subscribed == [("candles", ("BTC-EUR",), "1m")]
    handler.on_event({"event": "candle", "market": "BTC-EUR", "interval": "1m",
                      "candle": [[T0, "74096.00", "74101", "74090.5", "74100", "0.01000000"]]})
    handler.on_event({"event": "candle", "market": "XRP-EUR", "interval": "1m",  # not ours
                      "candle": [[T0, "1", "1", "1", "1", "1"]]})
    handler.on_event({"event": "candle", "market": "BTC-EUR", "interval": "1m",
                      "candle": [[T0, "74096", "74000", "74090", "74100", "1"]]})  # high < open
    handler.on_event({"event": "candle", "market": "BTC-EUR", "interval": "1m", "candle": "nope"})
    [(channel, row, stream)] = sink.emitted
    assert (channel, stream) == ("candles/1m", "bitvavo:candles:1m")
    assert set(row) == CONTRACT_FIELDS
    assert (row["ts"], row["open_ts"], row["market"], row["interval"]) == (T0, T0, "BTC-EUR", "1m")
    assert [row[k] for k in ("open", "high", "low", "close", "volume")] == [
        "74096.00", "74101", "74090.5", "74100", "0.01000000"]
    assert handler.summary()["events"] == 1 and handler.summary()["rejected"] == 2
    assert sample_value(harness.metrics.registry, "ingest_parse_errors_total", {"channel": "candles"}) == 2


async def test_no_backfill_before_the_socket_is_up_then_the_start_window_up_to_the_open_bucket(
        harness: Harness) -> None:
    handler = harness.handler
    await handler.set_markets(("BTC-EUR",), ())
    assert handler.plan_backfill() is None  # subscribed nowhere yet
    await handler.on_connect()
    # T0 is still open: the window ends there, it is never fetched nor called empty.
    assert handler.plan_backfill() == BackfillJob("BTC-EUR", "1m", T0 - 10 * MINUTE, T0)


async def test_a_just_closed_bucket_waits_for_the_settle_time(harness: Harness) -> None:
    handler, clock = harness.handler, harness.clock
    clock.now = T0 + 3_000  # bucket T0 - 1 minute ended 3 s ago, settle is 5 s
    await handler.set_markets(("BTC-EUR",), ())
    await handler.on_connect()
    job = handler.plan_backfill()
    assert job is not None and job.end_ts == T0 - MINUTE


async def test_backfill_emits_records_merged_empty_runs_and_then_owes_only_the_connect_bucket(
        harness: Harness) -> None:
    handler, clock, ledger = harness.handler, harness.clock, harness.ledger
    await handler.set_markets(("BTC-EUR",), ())
    await handler.on_connect()
    job = handler.plan_backfill()
    assert job is not None
    start = job.start_ts
    reply = BackfillReply(job, [], (job.start_ts, job.end_ts),
                          [candle(T0 - 2 * MINUTE, "101"), candle(start + 3 * MINUTE, "99")], rest_calls=1)
    handler.apply_backfill(reply)
    rows = rows_of(harness.sink)
    assert [r["open_ts"] for r in rows] == [start + 3 * MINUTE, T0 - 2 * MINUTE]  # oldest first
    assert all(set(r) == CONTRACT_FIELDS and r["ts"] == r["open_ts"] for r in rows)
    records = ledger.read("2025-09-23", "candles/1m")
    assert [(r.kind, r.market, r.start_ts, r.end_ts) for r in records] == [
        (GapKind.CANDLE_KNOWN_EMPTY, "BTC-EUR", start, start + 3 * MINUTE),
        (GapKind.CANDLE_KNOWN_EMPTY, "BTC-EUR", start + 4 * MINUTE, T0 - 2 * MINUTE),
        (GapKind.CANDLE_KNOWN_EMPTY, "BTC-EUR", T0 - MINUTE, T0)]
    assert handler.summary()["known_empty_buckets"] == 8 and handler.summary()["backfilled"] == 2
    assert handler.plan_backfill() is None
    # Bucket T0 (the socket came up in it) is fetched once it has closed and settled.
    clock.now = T0 + MINUTE + 4_000
    assert handler.plan_backfill() is None
    clock.now = T0 + MINUTE + 5_000
    assert handler.plan_backfill() == BackfillJob("BTC-EUR", "1m", T0, T0 + MINUTE)
    handler.apply_backfill(BackfillReply(BackfillJob("BTC-EUR", "1m", T0, T0 + MINUTE), [], (T0, T0 + MINUTE), [],
                                         rest_calls=1))
    clock.now += 10 * MINUTE
    assert handler.plan_backfill() is None  # caught up: the socket covers the rest


async def test_the_socket_sending_the_connect_bucket_makes_the_follow_up_unnecessary(harness: Harness) -> None:
    handler, clock = harness.handler, harness.clock
    await handler.set_markets(("BTC-EUR",), ())
    await handler.on_connect()
    job = handler.plan_backfill()
    assert job is not None
    handler.apply_backfill(BackfillReply(job, [], (job.start_ts, job.end_ts), [], rest_calls=1))
    handler.on_event({"event": "candle", "market": "BTC-EUR", "interval": "1m",
                      "candle": [[T0, "100", "100", "100", "100", "1"]]})
    clock.now = T0 + 3 * MINUTE
    assert handler.plan_backfill() is None


async def test_after_a_reconnect_a_caught_up_series_refetches_from_its_newest_candle(harness: Harness) -> None:
    handler, clock = harness.handler, harness.clock
    await handler.set_markets(("BTC-EUR",), ())
    await handler.on_connect()
    job = handler.plan_backfill()
    assert job is not None
    handler.apply_backfill(BackfillReply(job, [], (job.start_ts, job.end_ts), [], rest_calls=1))
    for minute in (0, 1, 2):  # live candles; bucket T0 sent by the socket, so nothing more is owed
        handler.on_event({"event": "candle", "market": "BTC-EUR", "interval": "1m",
                          "candle": [[T0 + minute * MINUTE, "100", "100", "100", "100", "1"]]})
    clock.now = T0 + 2 * MINUTE + 40_000
    assert handler.plan_backfill() is None
    # Down for 3 minutes (the reconnect window itself is recorded in local time, like every handler's).
    harness.ws.stats.disconnected_at_ms = now_ms() - 3 * MINUTE
    clock.now = T0 + 5 * MINUTE + 40_000
    await handler.on_connect()
    assert handler.plan_backfill() == BackfillJob("BTC-EUR", "1m", T0 + 2 * MINUTE, T0 + 5 * MINUTE)
    days = {utc_day(now_ms() - 3 * MINUTE), utc_day(now_ms())}
    reconnects = [r for day in sorted(days) for r in harness.ledger.read(day, "candles/1m")]
    assert [(r.kind, r.market) for r in reconnects][:1] == [(GapKind.RECONNECT, None)]


async def test_a_market_that_left_the_universe_drops_its_state_and_late_replies(harness: Harness) -> None:
    handler = harness.handler
    harness.ws.connected = True
    await handler.set_markets(("BTC-EUR", "ETH-EUR"), ())
    job = handler.plan_backfill()
    assert job is not None and job.market == "BTC-EUR"
    await handler.set_markets((), ("BTC-EUR",))
    assert harness.ws.unsubscribed == [("candles", ("BTC-EUR",), "1m")]
    handler.apply_backfill(BackfillReply(job, [], (job.start_ts, job.end_ts), [candle(job.start_ts)], rest_calls=1))
    assert harness.sink.emitted == []
    assert handler.markets == ("ETH-EUR",)
    assert handler.plan_backfill() == BackfillJob("ETH-EUR", "1m", T0 - 10 * MINUTE, T0)


def test_fetch_requests_nothing_the_ledger_knows_empty(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, int | None, int | None, int | None]] = []

    def fake_candles(self: BitvavoRest, market: str, interval: str, *, limit: int | None = None,
                     start_ms: int | None = None, end_ms: int | None = None) -> list[Candle]:
        calls.append((market, interval, limit, start_ms, end_ms))
        return [candle(T0 - 3 * MINUTE)]

    monkeypatch.setattr(BitvavoRest, "candles", fake_candles)
    handler, ledger = harness.handler, harness.ledger
    job = BackfillJob("BTC-EUR", "1m", T0 - 10 * MINUTE, T0)
    ledger.record(GapRecord(GapKind.CANDLE_KNOWN_EMPTY, "candles/1m", T0 - 10 * MINUTE, T0, market="BTC-EUR"))
    reply = handler.fetch_backfill(job)
    assert calls == [] and reply.span is None and reply.rest_calls == 0

    ledger.record(GapRecord(GapKind.CANDLE_KNOWN_EMPTY, "candles/1m", T0 - 10 * MINUTE, T0 - 4 * MINUTE,
                            market="ETH-EUR"))
    other = handler.fetch_backfill(BackfillJob("ETH-EUR", "1m", T0 - 10 * MINUTE, T0))
    assert calls == [("ETH-EUR", "1m", 4, T0 - 4 * MINUTE, T0)]
    assert other.span == (T0 - 4 * MINUTE, T0) and other.candles == [candle(T0 - 3 * MINUTE)]


async def test_a_candle_identical_to_the_last_one_published_is_not_emitted_again(harness: Harness) -> None:
    handler = harness.handler
    harness.ws.connected = True
    await handler.set_markets(("BTC-EUR",), ())
    handler.on_event({"event": "candle", "market": "BTC-EUR", "interval": "1m",
                      "candle": [[T0 - MINUTE, "100", "101", "99", "100.5", "2"]]})
    job = BackfillJob("BTC-EUR", "1m", T0 - MINUTE, T0)
    handler.apply_backfill(BackfillReply(job, [], (T0 - MINUTE, T0), [
        Candle(T0 - MINUTE, Decimal("100"), Decimal("101"), Decimal("99"), Decimal("100.5"), Decimal("2"))], 1))
    assert len(harness.sink.emitted) == 1 and handler.summary()["known_empty_buckets"] == 0
