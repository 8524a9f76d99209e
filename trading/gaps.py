"""The gap ledger (design §5): every hole in recorded data, written beside the data.

A record's interval is half-open, [start_ts, end_ts) in UTC ms. Records of data channel
`orderbook/update` live in lake channel `gaps/orderbook/update` (one daily file per channel
per UTC day, so each ingest loop owns its ledger file) and are partitioned by `start_ts`:
the ledger of a day says what is missing from that day. A record that crosses UTC midnight
is split there, so every day's ledger is complete on its own.

`candle_known_empty` marks intervals the exchange has no candles for (Bitvavo omits
candles without trades); `known_empty()` lets a backfiller skip them instead of
re-fetching forever.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Any

from trading.clock import now_ms
from trading.lake import DAY_MS, LakeWriter, TornTail, channel_files, read_jsonl, utc_day, validate_channel

log = logging.getLogger(__name__)

GAPS_CHANNEL_PREFIX = "gaps"
GAP_ROW_VERSION = 1


class GapKind(StrEnum):
    NONCE_GAP = "nonce_gap"
    RESYNC = "resync"
    RECONNECT = "reconnect"
    CANDLE_MISSING = "candle_missing"
    CANDLE_KNOWN_EMPTY = "candle_known_empty"


@dataclass(frozen=True)
class GapRecord:
    """One hole: `market` None means every market of the channel (e.g. a dropped socket)."""

    kind: GapKind
    channel: str
    start_ts: int
    end_ts: int
    market: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)
    recorded_ts: int = field(default_factory=now_ms)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", GapKind(self.kind))
        validate_channel(self.channel)
        if self.end_ts < self.start_ts:
            raise ValueError(f"gap {self.kind} on {self.channel}: end_ts {self.end_ts} < start_ts {self.start_ts}")

    def to_row(self) -> dict[str, Any]:
        return {"v": GAP_ROW_VERSION, "kind": self.kind.value, "market": self.market, "channel": self.channel,
                "start_ts": self.start_ts, "end_ts": self.end_ts, "detail": dict(self.detail),
                "recorded_ts": self.recorded_ts}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> GapRecord:
        return cls(kind=GapKind(row["kind"]), channel=row["channel"], start_ts=row["start_ts"],
                   end_ts=row["end_ts"], market=row.get("market"), detail=row.get("detail") or {},
                   recorded_ts=row["recorded_ts"])

    def split_at_midnight(self) -> list[GapRecord]:
        parts: list[GapRecord] = []
        start = self.start_ts
        while (start // DAY_MS + 1) * DAY_MS < self.end_ts:
            midnight = (start // DAY_MS + 1) * DAY_MS
            parts.append(replace(self, start_ts=start, end_ts=midnight))
            start = midnight
        parts.append(replace(self, start_ts=start))
        return parts


def gaps_channel(channel: str) -> str:
    return f"{GAPS_CHANNEL_PREFIX}/{validate_channel(channel)}"


class GapLedger:
    """Writes gap records (one lake writer per data channel, opened on first use) and reads them back."""

    def __init__(self, root: Path, *, fsync: bool = False) -> None:
        self.root = root
        self.fsync = fsync
        self._writers: dict[str, LakeWriter] = {}
        self.counts: Counter[tuple[GapKind, str]] = Counter()  # (kind, channel) -> records, for metrics

    def record(self, records: GapRecord | Iterable[GapRecord]) -> None:
        batch = [records] if isinstance(records, GapRecord) else list(records)
        by_channel: dict[str, list[dict[str, Any]]] = {}
        for record in batch:
            rows = by_channel.setdefault(record.channel, [])
            rows.extend(part.to_row() for part in record.split_at_midnight())
        for channel, rows in by_channel.items():
            self._writer(channel).write_batch(rows)
        for record in batch:
            self.counts[(record.kind, record.channel)] += 1

    def _writer(self, channel: str) -> LakeWriter:
        writer = self._writers.get(channel)
        if writer is None:
            writer = LakeWriter(self.root, gaps_channel(channel), hourly=False, fsync=self.fsync,
                                time_fields=("start_ts",))
            self._writers[channel] = writer
        return writer

    def read(self, day: date | str, channel: str | None = None) -> list[GapRecord]:
        """Records whose interval starts on UTC `day`, for one channel or all, ordered by start."""
        day = day if isinstance(day, date) else date.fromisoformat(day)
        if channel is not None:
            files = channel_files(self.root, day, gaps_channel(channel))
        else:
            directory = self.root / day.isoformat() / GAPS_CHANNEL_PREFIX
            files = sorted(directory.rglob("*.jsonl")) if directory.is_dir() else []
        records = [GapRecord.from_row(row) for path in files for row in read_jsonl(path, on_torn_tail=_skip_tail)]
        records.sort(key=lambda r: (r.start_ts, r.end_ts))
        return records

    def known_empty(self, channel: str, market: str, start_ts: int, end_ts: int) -> list[tuple[int, int]]:
        """Merged [start, end) intervals within [start_ts, end_ts) known to have no candles."""
        intervals: list[tuple[int, int]] = []
        for day_index in range(start_ts // DAY_MS, (max(end_ts, start_ts + 1) - 1) // DAY_MS + 1):
            for record in self.read(utc_day(day_index * DAY_MS), channel):
                if (record.kind is GapKind.CANDLE_KNOWN_EMPTY and record.market == market
                        and record.start_ts < end_ts and record.end_ts > start_ts):
                    intervals.append((max(record.start_ts, start_ts), min(record.end_ts, end_ts)))
        intervals.sort()
        merged: list[tuple[int, int]] = []
        for start, end in intervals:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged

    def close(self) -> None:
        writers, self._writers = self._writers, {}
        for writer in writers.values():
            writer.close()


def covers(intervals: list[tuple[int, int]], start_ts: int, end_ts: int) -> bool:
    """True when [start_ts, end_ts) lies inside one of the merged, sorted `intervals`."""
    position = bisect.bisect_right(intervals, start_ts, key=lambda interval: interval[0]) - 1
    return position >= 0 and intervals[position][1] >= end_ts


def _skip_tail(tail: TornTail) -> None:
    # A batch being written right now, or a crash leftover the file's next writer quarantines.
    log.debug("gap ledger: ignoring incomplete last line of %s", tail.path)
