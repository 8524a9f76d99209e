"""The Parquet schema of compacted lake rows, and lake file periods."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest

from trading.maintenance.parquet_rows import META_JSON_COLUMNS, SchemaBuilder, decode_table, write_rows
from trading.maintenance.partitions import Period, jsonl_period

T0 = 1_758_600_000_000  # 2025-09-23T04:00:00Z


def round_trip(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
    builder = SchemaBuilder()
    for row in rows:
        builder.add(row)
    buffer = io.BytesIO()
    assert write_rows(buffer, [rows], builder.schema(), {}) == len(rows)
    table = pq.read_table(io.BytesIO(buffer.getvalue()))
    return decode_table(table), table.schema


def test_types_follow_the_json_values() -> None:
    rows = [{"flag": True, "n": 2**63 - 1, "huge": 2**63, "x": 0.5, "s": "0.1", "none": None, "mix": True},
            {"flag": False, "n": -(2**63), "huge": 1, "x": 1.25, "s": "2", "none": None, "mix": 1}]
    decoded, schema = round_trip(rows)
    assert decoded == rows
    types = {field.name: str(field.type) for field in schema}
    assert types == {"flag": "bool", "n": "int64", "huge": "string", "x": "double", "s": "string",
                     "none": "string", "mix": "string"}
    assert orjson.loads(schema.metadata[META_JSON_COLUMNS]) == ["huge", "mix"]  # bool and int stay apart


def test_columns_are_the_union_in_first_seen_order() -> None:
    decoded, schema = round_trip([{"b": 1}, {"a": "x", "b": 2}, {"c": [1, {"d": None}]}])
    assert schema.names == ["b", "a", "c"]
    assert decoded == [{"b": 1, "a": None, "c": None}, {"b": 2, "a": "x", "c": None},
                       {"b": None, "a": None, "c": [1, {"d": None}]}]


@pytest.mark.parametrize(("name", "period"), [
    ("ticker24h.2025-09-23T04.jsonl", Period(T0, T0 + 3_600_000)),
    ("gaps-candles-1m.2025-09-23.jsonl", Period(T0 - 4 * 3_600_000, T0 + 20 * 3_600_000)),
    ("ticker24h.2025-09-23T24.jsonl", None),
    ("ticker24h.2025-02-30T01.jsonl", None),
    ("export.jsonl", None),
    ("ticker24h.2025-09-23T04.jsonl.quarantine", None),
])
def test_file_periods(name: str, period: Period | None) -> None:
    assert jsonl_period(Path(name)) == period
