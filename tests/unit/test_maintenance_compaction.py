"""Compaction on a temporary lake: every row kept, idempotent, torn tails quarantined, held files skipped."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest

from trading.lake import LakeWriter, lake_file_path, read_jsonl
from trading.maintenance.compaction import (
    COMPACTED,
    ERROR,
    FINISHED,
    HELD,
    IGNORED,
    compact_lake,
    parquet_path,
)
from trading.maintenance.parquet_rows import META_JSON_COLUMNS, read_parquet_rows

T0 = 1_758_600_000_000  # 2025-09-23T04:00:00Z
HOUR = 3_600_000
DAY = 24 * HOUR
GRACE = 15 * 60_000


def compact(root: Path, now: int = T0 + 2 * HOUR) -> Any:
    return compact_lake(root, now_ms=now, grace_ms=GRACE, daily_grace_ms=6 * HOUR)


def mixed_rows(n: int, ts: int = T0) -> list[dict[str, Any]]:
    """Rows as the lake holds them: decimals as strings, ints, nested lists, keys that come and go."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        row: dict[str, Any] = {"v": 1, "recv_ts": ts + i, "market": "BTC-EUR", "price": f"7551{i}.10",
                               "bids": [["75510.1", "0.5"]] * (i % 3)}
        if i % 2:
            row["nonce"] = i
        if i % 5 == 0:
            row["detail"] = {"expected": i, "got": i + 3}
        if i == 3:
            row["mixed"] = "3"
        if i == 4:
            row["mixed"] = 4
        row["maybe"] = None if i % 4 else True
        rows.append(row)
    return rows


def write(root: Path, channel: str, rows: list[dict[str, Any]], *, hourly: bool = True) -> Path:
    with LakeWriter(root, channel, hourly=hourly) as writer:
        writer.write_batch(rows)
        return writer.path_for(rows[0].get("recv_ts") or rows[0]["start_ts"])


def normalized(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parquet reads an absent key as None: fill the union of keys the same way."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return [{key: row.get(key) for key in keys} for row in rows]


def test_every_row_is_kept_with_values_as_in_json(tmp_path: Path) -> None:
    rows = mixed_rows(200)
    jsonl = write(tmp_path, "orderbook/update", rows)
    original = list(read_jsonl(jsonl))

    report = compact(tmp_path)

    assert [(o.action, o.rows) for o in report.files] == [(COMPACTED, 200)]
    assert not jsonl.exists()
    parquet = parquet_path(jsonl)
    assert parquet.name == "orderbook-update.2025-09-23T04.parquet"
    assert read_parquet_rows(parquet) == normalized(original)
    schema = pq.read_schema(parquet)
    assert str(schema.field("price").type) == "string"  # decimals stay strings: money is never float
    assert str(schema.field("recv_ts").type) == "int64" and str(schema.field("nonce").type) == "int64"
    assert str(schema.field("maybe").type) == "bool"
    assert orjson.loads(schema.metadata[META_JSON_COLUMNS]) == ["bids", "detail", "mixed"]
    assert pq.ParquetFile(parquet).metadata.row_group(0).column(0).compression == "ZSTD"
    assert report.summary()["rows_compacted"] == 200


def test_a_second_run_changes_nothing(tmp_path: Path) -> None:
    write(tmp_path, "ticker24h", mixed_rows(10))
    write(tmp_path, "ticker24h", mixed_rows(10, T0 + HOUR))
    first = compact(tmp_path, now=T0 + 3 * HOUR)
    assert [o.action for o in first.files] == [COMPACTED, COMPACTED]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}

    second = compact(tmp_path, now=T0 + 3 * HOUR)

    assert second.files == [] and second.summary()["compacted"] == 0
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()} == before


def test_open_hour_and_grace_period_are_left_alone(tmp_path: Path) -> None:
    jsonl = write(tmp_path, "ticker24h", mixed_rows(3))
    report = compact(tmp_path, now=T0 + HOUR + GRACE - 1)  # the hour ended, the grace has not
    assert report.files == [] and report.not_closed == 1 and jsonl.exists()
    assert [o.action for o in compact(tmp_path, now=T0 + HOUR + GRACE).files] == [COMPACTED]


def test_torn_tail_is_quarantined_not_lost(tmp_path: Path) -> None:
    jsonl = write(tmp_path, "ticker24h", mixed_rows(5))
    fragment = b'{"recv_ts":1758600000999,"market":"BT'
    with open(jsonl, "ab") as file:
        file.write(fragment)

    report = compact(tmp_path)

    assert [(o.action, o.rows) for o in report.files] == [(COMPACTED, 5)]
    assert report.torn_tails_quarantined == 1
    quarantine = jsonl.with_name(jsonl.name + ".quarantine")
    assert report.quarantine_files == [str(quarantine.relative_to(tmp_path))]
    record = orjson.loads(quarantine.read_bytes())
    assert base64.b64decode(record["base64"]) == fragment
    assert len(read_parquet_rows(parquet_path(jsonl))) == 5
    assert compact(tmp_path).quarantine_files == report.quarantine_files  # evidence is kept, still reported


def test_file_with_only_a_torn_line_becomes_an_empty_parquet(tmp_path: Path) -> None:
    jsonl = lake_file_path(tmp_path, "ticker24h", T0)
    jsonl.parent.mkdir(parents=True)
    jsonl.write_bytes(b'{"recv_ts":1')
    report = compact(tmp_path)
    assert [(o.action, o.rows) for o in report.files] == [(COMPACTED, 0)]
    assert pq.ParquetFile(parquet_path(jsonl)).metadata.num_rows == 0
    assert jsonl.with_name(jsonl.name + ".quarantine").exists()


def test_a_file_a_writer_holds_is_skipped_and_reported(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path, "ticker24h")
    try:
        writer.write_batch(mixed_rows(4))
        report = compact(tmp_path)
        assert [(o.action, o.detail) for o in report.files] == [(HELD, "a writer holds the file")]
        assert writer.path_for(T0).exists() and not parquet_path(writer.path_for(T0)).exists()
    finally:
        writer.close()
    assert [o.action for o in compact(tmp_path).files] == [COMPACTED]


def test_crash_after_rename_before_unlink_only_removes_the_jsonl(tmp_path: Path) -> None:
    jsonl = write(tmp_path, "ticker24h", mixed_rows(7))
    saved = tmp_path / "saved.jsonl"
    shutil.copyfile(jsonl, saved)
    compact(tmp_path)
    parquet_bytes = parquet_path(jsonl).read_bytes()
    shutil.copyfile(saved, jsonl)  # as if the first run had stopped right before its unlink

    report = compact(tmp_path)

    assert [(o.action, o.rows) for o in report.files] == [(FINISHED, 7)]
    assert not jsonl.exists() and parquet_path(jsonl).read_bytes() == parquet_bytes


def test_rows_written_after_compaction_are_an_error_and_nothing_is_touched(tmp_path: Path) -> None:
    jsonl = write(tmp_path, "ticker24h", mixed_rows(3))
    compact(tmp_path)
    parquet_bytes = parquet_path(jsonl).read_bytes()
    write(tmp_path, "ticker24h", mixed_rows(2))  # a late writer re-creates the hour's JSONL

    report = compact(tmp_path)

    assert [o.action for o in report.files] == [ERROR]
    assert "already exists with 3 rows" in report.files[0].detail and "has 2 rows" in report.files[0].detail
    assert len(list(read_jsonl(jsonl))) == 2 and parquet_path(jsonl).read_bytes() == parquet_bytes


def test_a_malformed_line_fails_that_file_only(tmp_path: Path) -> None:
    bad = write(tmp_path, "ticker24h", mixed_rows(2))
    with open(bad, "ab") as file:
        file.write(b"not json\n")
    good = write(tmp_path, "candles/1m", mixed_rows(2))

    report = compact(tmp_path)

    outcomes = {o.path: o for o in report.files}
    assert outcomes[str(good.relative_to(tmp_path))].action == COMPACTED
    failed = outcomes[str(bad.relative_to(tmp_path))]
    assert failed.action == ERROR and ":3: not a JSON line" in failed.detail
    assert bad.exists() and not parquet_path(bad).exists()
    assert not list(bad.parent.glob(".*.tmp"))


def test_daily_files_wait_for_their_own_grace(tmp_path: Path) -> None:
    rows = [{"v": 1, "kind": "nonce_gap", "market": None, "channel": "orderbook/update", "start_ts": T0,
             "end_ts": T0 + 5, "detail": {"expected": 1, "got": 3}, "recorded_ts": T0}]
    with LakeWriter(tmp_path, "gaps/orderbook/update", hourly=False, time_fields=("start_ts",)) as writer:
        writer.write_batch(rows)
        ledger = writer.path_for(T0)
    midnight = (T0 // DAY + 1) * DAY
    assert compact(tmp_path, now=midnight + 6 * HOUR - 1).not_closed == 1
    report = compact(tmp_path, now=midnight + 6 * HOUR)
    assert [o.action for o in report.files] == [COMPACTED]
    assert read_parquet_rows(parquet_path(ledger)) == rows


def test_non_partition_directories_and_foreign_names_are_left_alone(tmp_path: Path) -> None:
    decisions = tmp_path / "decisions"
    decisions.mkdir()
    (decisions / "notes.jsonl").write_bytes(b'{"a":1}\n')
    foreign = tmp_path / "2025-09-23" / "misc" / "export.jsonl"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b'{"a":1}\n')

    report = compact(tmp_path)

    assert [(o.path, o.action) for o in report.files] == [("2025-09-23/misc/export.jsonl", IGNORED)]
    assert foreign.exists() and (decisions / "notes.jsonl").exists()


def test_negative_grace_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="grace"):
        compact_lake(tmp_path, now_ms=T0, grace_ms=-1, daily_grace_ms=0)
