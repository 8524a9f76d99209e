"""The Parquet form of lake rows (schema version 1), written by compaction.

Values stay as they are in the JSON lines; nothing is converted to a lossy type:

- One column per top-level key found in any row of the file, in first-seen order. A row
  without the key has null there, so in Parquet an absent key and a JSON null read the same.
- A column whose non-null values are all bool is `bool`; all int (within int64) `int64`; all
  float `double`; all str `string`. Decimals are strings in the lake and stay strings: money
  is never float. A column with only nulls is `string`.
- Anything else (objects, arrays, a mix of types, ints beyond int64) is a `string` column
  holding each value's JSON text; the file metadata lists these columns, and
  `decode_table` turns them back into JSON values.
- File metadata: `trading.lake.schema` ("1"), `.source` (the JSONL file name),
  `.source_sha256` (of its bytes), `.rows`, `.json_columns` (a JSON list).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow ships no type hints
import pyarrow.parquet as pq  # type: ignore[import-untyped]

SCHEMA_VERSION = "1"
META_SCHEMA = b"trading.lake.schema"
META_SOURCE = b"trading.lake.source"
META_SOURCE_SHA256 = b"trading.lake.source_sha256"
META_ROWS = b"trading.lake.rows"
META_JSON_COLUMNS = b"trading.lake.json_columns"
COMPRESSION = "zstd"
ParquetError: type[Exception] = pa.ArrowException  # what pyarrow raises for an unreadable file

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_ARROW_TYPES = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string(),
                "json": pa.string()}


def _kind(value: Any) -> str:
    kind = type(value)
    if kind is bool:
        return "bool"
    if kind is int:
        return "int" if _INT64_MIN <= value <= _INT64_MAX else "json"
    if kind is float:
        return "float"
    if kind is str:
        return "str"
    return "json"


@dataclass(frozen=True)
class LakeSchema:
    columns: tuple[tuple[str, str], ...]  # (name, kind); kind is a key of _ARROW_TYPES

    @property
    def json_columns(self) -> list[str]:
        return [name for name, kind in self.columns if kind == "json"]

    def arrow(self, metadata: Mapping[bytes, bytes]) -> pa.Schema:
        fields = [pa.field(name, _ARROW_TYPES[kind]) for name, kind in self.columns]
        return pa.schema(fields).with_metadata(
            {**metadata, META_SCHEMA: SCHEMA_VERSION.encode(),
             META_JSON_COLUMNS: orjson.dumps(self.json_columns)})


class SchemaBuilder:
    """Collects the union of keys and the kinds of their values over a file's rows."""

    def __init__(self) -> None:
        self._kinds: dict[str, set[str]] = {}  # insertion order = first-seen column order
        self.rows = 0

    def add(self, row: Mapping[str, Any]) -> None:
        self.rows += 1
        for key, value in row.items():
            kinds = self._kinds.setdefault(key, set())
            if value is not None:
                kinds.add(_kind(value))

    def schema(self) -> LakeSchema:
        return LakeSchema(tuple((name, _column_kind(kinds)) for name, kinds in self._kinds.items()))


def _column_kind(kinds: set[str]) -> str:
    if not kinds:
        return "str"
    return next(iter(kinds)) if len(kinds) == 1 else "json"


def encode_batch(rows: Sequence[Mapping[str, Any]], schema: LakeSchema, arrow_schema: pa.Schema) -> pa.RecordBatch:
    arrays = []
    for name, kind in schema.columns:
        values = [row.get(name) for row in rows]
        if kind == "json":
            values = [None if value is None else orjson.dumps(value).decode() for value in values]
        arrays.append(pa.array(values, type=_ARROW_TYPES[kind]))
    return pa.RecordBatch.from_arrays(arrays, schema=arrow_schema)


def write_rows(target: IO[bytes], batches: Iterable[Sequence[Mapping[str, Any]]], schema: LakeSchema,
               metadata: Mapping[bytes, bytes]) -> int:
    """Write the batches as row groups of one zstd Parquet file; returns the rows written.
    `target` stays open (the caller fsyncs it)."""
    arrow_schema = schema.arrow(metadata)
    rows = 0
    with pq.ParquetWriter(target, arrow_schema, compression=COMPRESSION) as writer:
        for batch in batches:
            if batch:
                writer.write_batch(encode_batch(batch, schema, arrow_schema))
                rows += len(batch)
    return rows


@dataclass(frozen=True)
class ParquetFacts:
    rows: int  # from the Parquet footer
    declared_rows: int | None  # what compaction wrote into the metadata
    source_sha256: str | None


def parquet_facts(path: Path) -> ParquetFacts:
    metadata = pq.ParquetFile(path).metadata
    extra = metadata.metadata or {}
    declared = extra.get(META_ROWS)
    sha = extra.get(META_SOURCE_SHA256)
    return ParquetFacts(metadata.num_rows, None if declared is None else int(declared),
                        None if sha is None else sha.decode())


def decode_table(table: pa.Table) -> list[dict[str, Any]]:
    """Rows as JSON values again (JSON-text columns parsed); absent keys read as None."""
    raw = (table.schema.metadata or {}).get(META_JSON_COLUMNS)
    json_columns = set(orjson.loads(raw)) if raw else set()
    rows: list[dict[str, Any]] = table.to_pylist()
    for row in rows:
        for name in json_columns:
            text = row.get(name)
            if text is not None:
                row[name] = orjson.loads(text)
    return rows


def read_parquet_rows(path: Path) -> list[dict[str, Any]]:
    return decode_table(pq.read_table(path))


def read_row_count(path: Path) -> int:
    """Rows of a Parquet file, found by reading (and so decompressing and checking) every page."""
    rows: int = pq.read_table(path).num_rows
    return rows
