from datetime import date
from pathlib import Path

import pytest

from trading.gaps import GapKind, GapLedger, GapRecord, covers
from trading.lake import LakeLockedError, channel_files

MIDNIGHT = 1_758_672_000_000  # 2025-09-24T00:00:00Z
MINUTE = 60_000


def test_records_round_trip_through_the_lake(tmp_path: Path) -> None:
    ledger = GapLedger(tmp_path)
    nonce_gap = GapRecord(GapKind.NONCE_GAP, "orderbook/update", MIDNIGHT - 5000, MIDNIGHT - 4000,
                          market="BTC-EUR", detail={"expected": 101, "got": 105}, recorded_ts=MIDNIGHT - 3000)
    reconnect = GapRecord(GapKind.RECONNECT, "orderbook/update", MIDNIGHT - 9000, MIDNIGHT - 8000,
                          detail={"reason": "silence"}, recorded_ts=MIDNIGHT - 7000)
    ledger.record([nonce_gap, reconnect])
    ledger.close()
    assert GapLedger(tmp_path).read("2025-09-23", "orderbook/update") == [reconnect, nonce_gap]


def test_each_data_channel_has_its_own_ledger_file_beside_the_data(tmp_path: Path) -> None:
    ledger = GapLedger(tmp_path)
    book = GapRecord(GapKind.RESYNC, "orderbook/update", MIDNIGHT, MIDNIGHT + 10, market="ETH-EUR")
    candle = GapRecord(GapKind.CANDLE_MISSING, "candles/1m", MIDNIGHT, MIDNIGHT + MINUTE, market="ETH-EUR")
    ledger.record(book)
    ledger.record(candle)
    ledger.close()
    assert [p.relative_to(tmp_path).as_posix() for p in channel_files(tmp_path, date(2025, 9, 24),
                                                                     "gaps/candles/1m")] == [
        "2025-09-24/gaps/candles/1m/gaps-candles-1m.2025-09-24.jsonl"]
    assert ledger.read(date(2025, 9, 24)) == [book, candle]
    assert ledger.read(date(2025, 9, 24), "candles/1m") == [candle]
    assert ledger.read(date(2025, 9, 25)) == []


def test_a_gap_across_midnight_is_split_so_each_day_is_complete(tmp_path: Path) -> None:
    ledger = GapLedger(tmp_path)
    ledger.record(GapRecord(GapKind.RECONNECT, "ticker24h", MIDNIGHT - 1000, MIDNIGHT + 2000, recorded_ts=1))
    [before] = ledger.read("2025-09-23", "ticker24h")
    [after] = ledger.read("2025-09-24", "ticker24h")
    assert (before.start_ts, before.end_ts) == (MIDNIGHT - 1000, MIDNIGHT)
    assert (after.start_ts, after.end_ts) == (MIDNIGHT, MIDNIGHT + 2000)
    assert ledger.counts[(GapKind.RECONNECT, "ticker24h")] == 1  # one gap, recorded in two parts
    ledger.close()


def test_records_are_partitioned_by_start_not_by_when_they_were_recorded(tmp_path: Path) -> None:
    ledger = GapLedger(tmp_path)
    backfilled = GapRecord(GapKind.CANDLE_KNOWN_EMPTY, "candles/1m", MIDNIGHT - 3 * MINUTE, MIDNIGHT - MINUTE,
                           market="XRP-EUR", recorded_ts=MIDNIGHT + 86_400_000)
    ledger.record(backfilled)
    assert ledger.read("2025-09-23", "candles/1m") == [backfilled]
    ledger.close()


def test_known_empty_candles_are_queryable_across_days(tmp_path: Path) -> None:
    ledger = GapLedger(tmp_path)
    ledger.record([
        GapRecord(GapKind.CANDLE_KNOWN_EMPTY, "candles/1m", MIDNIGHT - 2 * MINUTE, MIDNIGHT + MINUTE, market="XRP-EUR"),
        GapRecord(GapKind.CANDLE_KNOWN_EMPTY, "candles/1m", MIDNIGHT + MINUTE, MIDNIGHT + 2 * MINUTE, market="XRP-EUR"),
        GapRecord(GapKind.CANDLE_KNOWN_EMPTY, "candles/1m", MIDNIGHT + 5 * MINUTE, MIDNIGHT + 6 * MINUTE,
                  market="XRP-EUR"),
        GapRecord(GapKind.CANDLE_KNOWN_EMPTY, "candles/1m", MIDNIGHT, MIDNIGHT + 9 * MINUTE, market="BTC-EUR"),
        GapRecord(GapKind.CANDLE_MISSING, "candles/1m", MIDNIGHT + 3 * MINUTE, MIDNIGHT + 4 * MINUTE,
                  market="XRP-EUR"),
    ])
    intervals = ledger.known_empty("candles/1m", "XRP-EUR", MIDNIGHT - 10 * MINUTE, MIDNIGHT + 10 * MINUTE)
    assert intervals == [(MIDNIGHT - 2 * MINUTE, MIDNIGHT + 2 * MINUTE), (MIDNIGHT + 5 * MINUTE, MIDNIGHT + 6 * MINUTE)]
    assert covers(intervals, MIDNIGHT - MINUTE, MIDNIGHT)
    assert covers(intervals, MIDNIGHT + MINUTE, MIDNIGHT + 2 * MINUTE)
    assert not covers(intervals, MIDNIGHT + 3 * MINUTE, MIDNIGHT + 4 * MINUTE)  # missing is not empty
    assert not covers(intervals, MIDNIGHT + 4 * MINUTE, MIDNIGHT + 5 * MINUTE)
    assert not covers(intervals, MIDNIGHT - 3 * MINUTE, MIDNIGHT - 2 * MINUTE)
    assert ledger.known_empty("candles/1m", "XRP-EUR", MIDNIGHT + MINUTE, MIDNIGHT + 90_000) == [
        (MIDNIGHT + MINUTE, MIDNIGHT + 90_000)]
    ledger.close()


def test_counts_per_kind_and_channel_for_metrics(tmp_path: Path) -> None:
    ledger = GapLedger(tmp_path)
    ledger.record([GapRecord(GapKind.NONCE_GAP, "orderbook/update", 1, 2, market="BTC-EUR")] * 3)
    ledger.record(GapRecord(GapKind.RESYNC, "orderbook/update", 1, 2, market="BTC-EUR"))
    assert ledger.counts == {(GapKind.NONCE_GAP, "orderbook/update"): 3, (GapKind.RESYNC, "orderbook/update"): 1}
    ledger.close()


def test_a_second_ledger_writer_for_the_same_channel_fails_loudly(tmp_path: Path) -> None:
    record = GapRecord(GapKind.RESYNC, "ticker24h", MIDNIGHT, MIDNIGHT)
    first, second = GapLedger(tmp_path), GapLedger(tmp_path)
    first.record(record)
    with pytest.raises(LakeLockedError):
        second.record(record)
    first.close()
    second.close()


def test_invalid_records_are_refused() -> None:
    with pytest.raises(ValueError, match="end_ts"):
        GapRecord(GapKind.NONCE_GAP, "orderbook/update", 10, 9)
    with pytest.raises(ValueError, match="lake channel"):
        GapRecord(GapKind.NONCE_GAP, "../etc", 1, 2)
    with pytest.raises(ValueError, match="hole"):
        GapRecord("hole", "ticker24h", 1, 2)  # type: ignore[arg-type]
    assert GapRecord("resync", "ticker24h", 1, 2).kind is GapKind.RESYNC  # type: ignore[arg-type]
