"""Compaction: closed hot JSONL files become zstd Parquet beside them (design §5).

A file is closed when its period (the hour; the day for daily files such as the gap ledger)
ended at least a grace period ago and no writer holds its flock. For each closed file:

1. `recover_torn_tail` moves a torn last line to `<file>.quarantine` (quarantine files are
   evidence: they are kept and listed in the report, never compacted or deleted);
2. holding the writers' flock, the rows are read once for the schema (`parquet_rows`) and once
   more to write `.<name>.parquet.tmp` in the same directory, which is fsynced, renamed to
   `<name>.parquet` and the directory fsynced;
3. the Parquet is re-opened and its row count compared with the JSONL's; only when they are
   equal is the JSONL removed (and the directory fsynced again).

Re-running is harmless: a JSONL whose Parquet already exists with the same rows (same count,
and the source checksum recorded in the Parquet matches) was compacted by a run that stopped
before the unlink, so only the JSONL is removed. Any other existing Parquet is an error that
leaves both files untouched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trading.lake import (
    JSONL_SUFFIX,
    PARQUET_SUFFIX,
    QUARANTINE_SUFFIX,
    LakeFormatError,
    LakeLockedError,
    read_jsonl,
    recover_torn_tail,
)
from trading.maintenance.fsutil import FileDigest, file_digest, fsync_dir
from trading.maintenance.parquet_rows import (
    META_ROWS,
    META_SOURCE,
    META_SOURCE_SHA256,
    ParquetError,
    SchemaBuilder,
    parquet_facts,
    write_rows,
)
from trading.maintenance.partitions import day_partitions, jsonl_period, writer_lock

BATCH_ROWS = 50_000  # rows per Parquet row group; bounds memory for large hourly files

COMPACTED = "compacted"  # Parquet written, verified, JSONL removed
FINISHED = "finished"  # an earlier run wrote the Parquet; this run removed the JSONL
HELD = "held"  # a writer holds the file: skipped, taken by a later run
ERROR = "error"  # nothing removed; the detail says why
IGNORED = "ignored"  # a .jsonl whose name is not a lake file name


class CompactionError(RuntimeError):
    """A file cannot be compacted safely; its JSONL is kept."""


@dataclass(frozen=True)
class FileOutcome:
    path: str  # relative to the lake root
    action: str
    rows: int = 0
    detail: str = ""


@dataclass
class CompactionReport:
    files: list[FileOutcome] = field(default_factory=list)
    not_closed: int = 0  # JSONL files whose period (plus grace) has not ended
    torn_tails_quarantined: int = 0
    quarantine_files: list[str] = field(default_factory=list)

    def of(self, action: str) -> list[FileOutcome]:
        return [outcome for outcome in self.files if outcome.action == action]

    @property
    def errors(self) -> list[FileOutcome]:
        return self.of(ERROR)

    def summary(self) -> dict[str, Any]:
        return {"compacted": len(self.of(COMPACTED)), "finished": len(self.of(FINISHED)),
                "rows_compacted": sum(o.rows for o in self.of(COMPACTED)), "held": len(self.of(HELD)),
                "errors": len(self.errors), "ignored": len(self.of(IGNORED)), "not_closed": self.not_closed,
                "torn_tails_quarantined": self.torn_tails_quarantined,
                "quarantine_files": list(self.quarantine_files)}


def parquet_path(jsonl: Path) -> Path:
    return jsonl.with_suffix(PARQUET_SUFFIX)


def compact_lake(root: Path, *, now_ms: int, grace_ms: int, daily_grace_ms: int) -> CompactionReport:
    """Compact every closed JSONL file of every day partition; one file's failure does not stop
    the others (it is reported as an error)."""
    if grace_ms < 0 or daily_grace_ms < 0:
        raise ValueError("compaction grace periods must be >= 0")
    report = CompactionReport()
    for _day, day_dir in day_partitions(root):
        for path in sorted(day_dir.rglob("*" + JSONL_SUFFIX)):
            relative = str(path.relative_to(root))
            period = jsonl_period(path)
            if period is None:
                report.files.append(FileOutcome(relative, IGNORED, detail="not a lake file name"))
                continue
            if now_ms < period.end_ms + (grace_ms if period.hourly else daily_grace_ms):
                report.not_closed += 1
                continue
            report.files.append(_compact_reported(path, relative, report))
        report.quarantine_files += [str(p.relative_to(root)) for p in sorted(day_dir.rglob("*" + QUARANTINE_SUFFIX))]
    return report


def _compact_reported(path: Path, relative: str, report: CompactionReport) -> FileOutcome:
    try:
        action, rows, torn = compact_file(path)
    except LakeLockedError:
        return FileOutcome(relative, HELD, detail="a writer holds the file")
    except (CompactionError, LakeFormatError, OSError, ParquetError) as exc:
        return FileOutcome(relative, ERROR, detail=str(exc))
    report.torn_tails_quarantined += torn
    return FileOutcome(relative, action, rows, "torn tail quarantined" if torn else "")


def compact_file(path: Path) -> tuple[str, int, bool]:
    """Compact one closed JSONL file; returns (COMPACTED or FINISHED, rows, whether a torn tail
    was quarantined). Raises `LakeLockedError` when a writer holds it, `CompactionError` when
    it cannot be done safely."""
    torn = recover_torn_tail(path) is not None
    parquet = parquet_path(path)
    with writer_lock(path):
        source = file_digest(path)
        builder = SchemaBuilder()
        for row in read_jsonl(path):
            builder.add(row)
        if parquet.exists():
            _finish_earlier_run(path, parquet, source, builder.rows)
            return FINISHED, builder.rows, torn
        metadata = {META_SOURCE: path.name.encode(), META_SOURCE_SHA256: source.sha256.encode(),
                    META_ROWS: str(builder.rows).encode()}
        temporary = parquet.with_name(f".{parquet.name}.tmp")
        try:
            with open(temporary, "wb") as out:
                written = write_rows(out, _batches(path), builder.schema(), metadata)
                out.flush()
                os.fsync(out.fileno())
            if written != builder.rows:
                raise CompactionError(f"{path}: read {builder.rows} rows, then {written}; the file changed "
                                      "under the lock; JSONL kept")
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        os.replace(temporary, parquet)
        fsync_dir(parquet.parent)
        stored = parquet_facts(parquet).rows
        if stored != builder.rows:
            parquet.unlink()
            fsync_dir(parquet.parent)
            raise CompactionError(f"{parquet}: has {stored} rows after writing, the JSONL {builder.rows}; "
                                  "Parquet removed, JSONL kept")
        path.unlink()
        fsync_dir(path.parent)
    return COMPACTED, builder.rows, torn


def _finish_earlier_run(path: Path, parquet: Path, source: FileDigest, rows: int) -> None:
    facts = parquet_facts(parquet)
    if facts.rows == rows and facts.declared_rows == rows and facts.source_sha256 == source.sha256:
        path.unlink()
        fsync_dir(path.parent)
        return
    raise CompactionError(
        f"{parquet} already exists with {facts.rows} rows (source sha256 {facts.source_sha256}), but {path.name} "
        f"has {rows} rows (sha256 {source.sha256}): rows were written to the JSONL after it was compacted, or "
        "one of the files was changed. Neither file was touched; compare them and merge by hand "
        "(docs/maintenance.md).")


def _batches(path: Path) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in read_jsonl(path):
        batch.append(row)
        if len(batch) >= BATCH_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch
