"""The hot lake: JSONL files per channel, partitioned by UTC date (design §5; layout in docs/lake.md).

    $PARQUET_DIR/2026-09-23/orderbook/update/orderbook-update.2026-09-23T14.jsonl   (hourly)
    $PARQUET_DIR/2026-09-23/gaps/candles/1m/gaps-candles-1m.2026-09-23.jsonl          (daily)

One writer per file: `LakeWriter` holds an exclusive flock on every file it has open, so a
second writer (another process or another writer object) fails with `LakeLockedError`.
Each batch is one write(2) of whole lines: `write_batch(rows)`, or the rows collected by
`add_row`/`add_line` since the last `flush()` (a caller that batches by time, such as the ingest
sink, encodes each row as it comes and keeps no row objects alive until the write). A last
line without its newline (a crash mid-write) is moved to `<file>.quarantine` before the writer
appends again, and `read_jsonl` reports such a tail instead of parsing it. A write that fails
(disk full, read-only, I/O error) raises `LakeWriteError`; the partial batch is cut off again first.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from trading.clock import now_ms
from trading.decimals import format_decimal

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
JSONL_SUFFIX = ".jsonl"
PARQUET_SUFFIX = ".parquet"  # what compaction turns a closed JSONL file into (trading/maintenance/compaction.py)
QUARANTINE_SUFFIX = ".quarantine"
DEFAULT_TIME_FIELDS = ("recv_ts", "ts")
_CHANNEL_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_]*(/[a-z0-9][a-z0-9_]*)*$")
_EPOCH = date(1970, 1, 1)
_TAIL_SCAN_CHUNK = 65_536
_MAX_OPEN_FILES = 2  # the current period and the one before it, for late rows around rotation


class LakeWriteError(OSError):
    """The lake could not be written; the message names the file and what the OS said."""


class LakeLockedError(LakeWriteError):
    """Another writer holds the file."""


class LakeFormatError(ValueError):
    """A complete line of a lake file is not a JSON object, or a row cannot be placed."""


@dataclass(frozen=True)
class TornTail:
    path: Path
    offset: int  # byte offset where the incomplete line starts
    fragment: bytes


class TornTailError(LakeFormatError):
    def __init__(self, tail: TornTail) -> None:
        super().__init__(f"{tail.path}: the last line (offset {tail.offset}, {len(tail.fragment)} bytes) has no "
                         "newline: a writer crashed mid-write or is writing now; recover_torn_tail() "
                         "quarantines it once no writer holds the file")
        self.tail = tail


def validate_channel(channel: str) -> str:
    if not _CHANNEL_PATTERN.match(channel):
        raise ValueError(f"lake channel {channel!r}: allowed are lower-case words of a-z 0-9 _ joined by '/' "
                         "(e.g. 'orderbook/update', 'candles/1m')")
    return channel


def utc_day(ts_ms: int) -> date:
    return _EPOCH + timedelta(days=ts_ms // DAY_MS)


def channel_dir(root: Path, day: date, channel: str) -> Path:
    return root / day.isoformat() / validate_channel(channel)


def lake_file_path(root: Path, channel: str, ts_ms: int, *, hourly: bool = True) -> Path:
    """The file that holds rows of `channel` at `ts_ms`: one per UTC hour (or day)."""
    day = utc_day(ts_ms)
    period = f"{day.isoformat()}T{ts_ms // HOUR_MS % 24:02d}" if hourly else day.isoformat()
    return channel_dir(root, day, channel) / f"{channel.replace('/', '-')}.{period}{JSONL_SUFFIX}"


def channel_files(root: Path, day: date, channel: str) -> list[Path]:
    """The JSONL files of one channel and UTC day, oldest first."""
    directory = channel_dir(root, day, channel)
    return sorted(directory.glob(f"*{JSONL_SUFFIX}")) if directory.is_dir() else []


def channel_rows(root: Path, day: date, channel: str, *, on_torn_tail: Callable[[TornTail], None] | None = None
                 ) -> Iterator[tuple[str, dict[str, Any]]]:
    """(source, row) for every row of one channel and UTC day, hot and compacted alike, file by file in
    name (= time) order. A file compaction has turned into Parquet is read from the Parquet; while both
    exist (compaction verifies before it removes the JSONL), the JSONL is read. `source` is
    `<path>:<line or row number>`."""
    from trading.maintenance.parquet_rows import read_parquet_rows  # pyarrow only for readers that need it

    directory = channel_dir(root, day, channel)
    if not directory.is_dir():
        return
    stems = {path.name.removesuffix(JSONL_SUFFIX) for path in directory.glob(f"*{JSONL_SUFFIX}")}
    compacted = {path.name.removesuffix(PARQUET_SUFFIX) for path in directory.glob(f"*{PARQUET_SUFFIX}")
                 if not path.name.startswith(".")}  # not a compaction's temporary file
    for stem in sorted(stems | compacted):
        if stem in stems:
            path = directory / (stem + JSONL_SUFFIX)
            rows: Iterator[dict[str, Any]] = read_jsonl(path, on_torn_tail=on_torn_tail)
        else:
            path = directory / (stem + PARQUET_SUFFIX)
            rows = iter(read_parquet_rows(path))
        for number, row in enumerate(rows, 1):
            yield f"{path}:{number}", row


def read_jsonl(path: Path, *, on_torn_tail: Callable[[TornTail], None] | None = None) -> Iterator[dict[str, Any]]:
    """Rows of one lake file. A last line without newline is never parsed: it goes to
    `on_torn_tail`, or raises `TornTailError` when no callback is given (after the good rows)."""
    offset = 0
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            if not line.endswith(b"\n"):
                tail = TornTail(path, offset, line)
                if on_torn_tail is None:
                    raise TornTailError(tail)
                on_torn_tail(tail)
                return
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise LakeFormatError(f"{path}:{number}: not a JSON line: {line[:80]!r}") from None
            if not isinstance(row, dict):
                raise LakeFormatError(f"{path}:{number}: not a JSON object: {line[:80]!r}")
            yield row
            offset += len(line)


def recover_torn_tail(path: Path) -> TornTail | None:
    """Quarantine the torn last line of a file no writer holds (e.g. before compacting it)."""
    fd = _open_locked(path, create=False)
    try:
        return _quarantine_torn_tail(fd, path)
    finally:
        os.close(fd)


def _open_locked(path: Path, *, create: bool) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o644)
    except OSError as exc:
        raise _write_error(exc, path, "cannot open") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LakeLockedError(errno.EWOULDBLOCK, "another lake writer holds this file; exactly one writer per "
                              "file is allowed (is a second instance of this loop running?)", str(path)) from None
    return fd


def _write_error(exc: OSError, path: Path, what: str) -> LakeWriteError:
    reason = exc.strerror or str(exc)
    return LakeWriteError(exc.errno or errno.EIO, f"lake: {what}: {reason}", str(path))


def _quarantine_torn_tail(fd: int, path: Path) -> TornTail | None:
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return None
    keep, end = 0, size
    while end > 0:
        start = max(0, end - _TAIL_SCAN_CHUNK)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        end = start
    tail = TornTail(path, keep, os.pread(fd, size - keep, keep))
    record = {"quarantined_ts": now_ms(), "offset": keep, "length": len(tail.fragment),
              "text": tail.fragment.decode("utf-8", "replace"),
              "base64": base64.b64encode(tail.fragment).decode()}
    quarantine = path.with_name(path.name + QUARANTINE_SUFFIX)
    # The fragment is durable in the quarantine file before it leaves the data file.
    with open(quarantine, "ab") as out:
        out.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        out.flush()
        os.fsync(out.fileno())
    os.ftruncate(fd, keep)
    os.fsync(fd)
    log.warning("lake: torn last line of %s (%d bytes at offset %d) moved to %s",
                path, len(tail.fragment), keep, quarantine)
    return tail


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format_decimal(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


@dataclass
class LakeWriterStats:
    rows_written: int = 0
    batches_written: int = 0
    bytes_written: int = 0
    torn_tails_quarantined: int = 0


# Encoded lines per file period (period index -> the lines, newline-terminated). Lines are appended
# to one bytearray as they are encoded: orjson gives each dump a buffer of about a page, and keeping
# one per row until the write made the heap grow and shrink by megabytes per batch, about a page
# fault (2-3 us on the development VM) per row.
_Batch = dict[int, bytearray]


def _add(batch: _Batch, period: int, line: bytes) -> None:
    lines = batch.get(period)
    if lines is None:
        batch[period] = bytearray(line)
    else:
        lines += line


@dataclass
class _OpenFile:
    path: Path
    fd: int
    size: int


class LakeWriter:
    """Appends rows of one channel as JSONL lines, one file per UTC hour (or day).

    A row lands in the file of its first present `time_fields` value (ms), unless
    `write_batch(ts_ms=...)` places the whole batch. Decimals are written as strings.
    """

    def __init__(self, root: Path, channel: str, *, hourly: bool = True, fsync: bool = False,
                 time_fields: Sequence[str] = DEFAULT_TIME_FIELDS) -> None:
        self.root = root
        self.channel = validate_channel(channel)
        self.hourly = hourly
        self.fsync = fsync
        self._time_fields = tuple(time_fields)
        self._period_ms = HOUR_MS if hourly else DAY_MS
        self._files: dict[int, _OpenFile] = {}  # period index -> open file, least recently used first
        self._added: _Batch = {}  # rows waiting for flush()
        self._closed = False
        self.stats = LakeWriterStats()

    def path_for(self, ts_ms: int) -> Path:
        return lake_file_path(self.root, self.channel, ts_ms, hourly=self.hourly)

    def write_batch(self, rows: Sequence[Mapping[str, Any]], *, ts_ms: int | None = None) -> int:
        """Append rows (one write per file touched, flushed, fsynced if configured); returns rows written."""
        self._check_open()
        batch: _Batch = {}
        for row in rows:
            _add(batch, (ts_ms if ts_ms is not None else self._row_ts(row)) // self._period_ms, self._encode(row))
        return self._write(batch)

    def add_row(self, row: Mapping[str, Any]) -> None:
        """Encode `row` now (a row that cannot be encoded raises here); it is written by `flush()`."""
        self._check_open()
        _add(self._added, self._row_ts(row) // self._period_ms, self._encode(row))

    def add_line(self, ts_ms: int, line: bytes) -> None:
        """A row already encoded as one JSON line with its newline, exactly as `add_row` would encode
        it, placed by `ts_ms`; written by `flush()`. The caller vouches for the encoding."""
        period = ts_ms // self._period_ms
        lines = self._added.get(period)
        if lines is None:
            lines = self._added[period] = bytearray()
        lines += line

    def flush(self) -> int:
        """Write the rows added since the last flush as one batch; returns rows written."""
        self._check_open()
        batch, self._added = self._added, {}
        return self._write(batch)

    def _check_open(self) -> None:
        if self._closed:
            raise LakeWriteError(errno.EBADF, f"lake: writer of channel {self.channel!r} is closed")

    def _encode(self, row: Mapping[str, Any]) -> bytes:
        try:
            return orjson.dumps(row, default=_json_default, option=orjson.OPT_APPEND_NEWLINE)
        except TypeError as exc:
            raise LakeFormatError(f"lake channel {self.channel!r}: row not serializable: {exc}") from None

    def _write(self, batch: _Batch) -> int:
        written = 0
        for period, lines in batch.items():
            self._append(period, lines)
            rows = lines.count(b"\n")  # one row per line: JSON lines hold no raw newline
            self.stats.rows_written += rows
            written += rows
        if batch:
            self.stats.batches_written += 1
        return written

    def _row_ts(self, row: Mapping[str, Any]) -> int:
        for name in self._time_fields:
            ts = row.get(name)
            if ts is not None:
                if type(ts) is not int:
                    raise LakeFormatError(f"lake channel {self.channel!r}: {name} must be int ms, got {ts!r}")
                return ts
        raise LakeFormatError(f"lake channel {self.channel!r}: row has none of {self._time_fields} "
                              "and no ts_ms was given")

    def _append(self, period: int, payload: bytearray) -> None:
        file = self._file(period)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(file.fd, view):]
            if self.fsync:
                os.fsync(file.fd)
        except OSError as exc:
            self._cut_back(period, file)
            raise _write_error(exc, file.path, f"write of {len(payload)} bytes failed, batch NOT recorded") from exc
        file.size += len(payload)
        self.stats.bytes_written += len(payload)

    def _cut_back(self, period: int, file: _OpenFile) -> None:
        """Remove a partly written batch, so the next batch does not follow a torn line."""
        try:
            os.ftruncate(file.fd, file.size)
        except OSError:
            # The tail stays torn; the next writer to open the file quarantines it.
            del self._files[period]
            os.close(file.fd)

    def _file(self, period: int) -> _OpenFile:
        file = self._files.pop(period, None)
        if file is None:
            file = self._open(period)
            while len(self._files) >= _MAX_OPEN_FILES:
                oldest = next(iter(self._files))
                os.close(self._files.pop(oldest).fd)
        self._files[period] = file  # most recently used last
        return file

    def _open(self, period: int) -> _OpenFile:
        path = self.path_for(period * self._period_ms)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_error(exc, path.parent, "cannot create the partition directory") from exc
        fd = _open_locked(path, create=True)
        try:
            if _quarantine_torn_tail(fd, path) is not None:
                self.stats.torn_tails_quarantined += 1
            size = os.fstat(fd).st_size
        except OSError as exc:
            os.close(fd)
            raise _write_error(exc, path, "cannot check the last line") from exc
        return _OpenFile(path, fd, size)

    def close(self) -> None:
        """Write the rows still added (never dropped silently), then close every file."""
        try:
            if self._added and not self._closed:
                self.flush()
        finally:
            self._close_files()

    def _close_files(self) -> None:
        self._closed = True
        files, self._files = self._files, {}
        for file in files.values():
            os.close(file.fd)

    def __enter__(self) -> LakeWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
