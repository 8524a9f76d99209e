"""What maintenance needs to know about the lake layout (docs/lake.md): day partitions, the
period a JSONL file covers, and whether a writer still holds a file.

Only top-level `YYYY-MM-DD` directories are partitions; anything else under the lake root
(e.g. `decisions/`) is not lake data and is never compacted or rotated.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from trading.lake import DAY_MS, HOUR_MS, JSONL_SUFFIX, LakeLockedError

_EPOCH = date(1970, 1, 1)
_DAY_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_PERIOD_NAME = re.compile(r"\.(\d{4}-\d{2}-\d{2})(?:T(\d{2}))?" + re.escape(JSONL_SUFFIX) + "$")


@dataclass(frozen=True)
class Period:
    start_ms: int
    end_ms: int

    @property
    def hourly(self) -> bool:
        return self.end_ms - self.start_ms == HOUR_MS


def parse_day(name: str) -> date | None:
    if not _DAY_NAME.match(name):
        return None
    try:
        return date.fromisoformat(name)
    except ValueError:
        return None


def day_partitions(root: Path) -> list[tuple[date, Path]]:
    """The day directories under the lake root, oldest first."""
    if not root.is_dir():
        return []
    days = [(day, path) for path in root.iterdir() if path.is_dir() and (day := parse_day(path.name)) is not None]
    return sorted(days)


def jsonl_period(path: Path) -> Period | None:
    """The UTC hour (`...T14.jsonl`) or day (`....2026-09-23.jsonl`) a lake file covers; None if the
    name is not a lake file name."""
    match = _PERIOD_NAME.search(path.name)
    if match is None:
        return None
    day = parse_day(match.group(1))
    if day is None:
        return None
    midnight = (day - _EPOCH).days * DAY_MS
    if match.group(2) is None:
        return Period(midnight, midnight + DAY_MS)
    hour = int(match.group(2))
    if hour > 23:
        return None
    return Period(midnight + hour * HOUR_MS, midnight + (hour + 1) * HOUR_MS)


@contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """Hold the lake writers' exclusive flock on `path` for the block, so no writer appends
    meanwhile; raises `LakeLockedError` at once when a writer has the file open."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LakeLockedError(errno.EWOULDBLOCK, "a lake writer holds this file", str(path)) from None
        yield
    finally:
        os.close(fd)
