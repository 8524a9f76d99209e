"""Rotation: retention of the lake's day partitions (design §5).

`retention_days = N` keeps today's UTC partition and the N days before it; every older
`YYYY-MM-DD` directory is archived (moved whole under the archive root) or deleted. Today's
partition and anything newer are never touched, nor are non-partition directories such as
`decisions/`. A day with a JSONL file a writer still holds is skipped (and reported); while a
day is moved or deleted its JSONL files are held under the writers' flock, so no writer
appends to a file that is leaving.

Archiving renames the directory (atomic on one file system). Across file systems it copies
to `.<day>.partial` in the archive, fsyncs, renames into place, then deletes the source. When
the archive already has that day (files for it appeared in the lake after it was archived),
the files are merged in: a file already archived with the same bytes is dropped from the
lake; a different one is a conflict that keeps the day in the lake and is reported.
Re-running changes nothing: rotated days are gone from the lake.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from trading.lake import JSONL_SUFFIX, LakeLockedError
from trading.maintenance.fsutil import copy_durable, file_digest, fsync_dir, fsync_tree, is_within
from trading.maintenance.partitions import day_partitions, writer_lock

MODE_ARCHIVE = "archive"
MODE_DELETE = "delete"
ARCHIVED = "archived"
DELETED = "deleted"
HELD = "held"
ERROR = "error"


class RotationError(RuntimeError):
    pass


@dataclass(frozen=True)
class DayOutcome:
    day: str
    action: str
    files: int = 0
    bytes: int = 0
    detail: str = ""


@dataclass
class RotationReport:
    cutoff: str  # days before this one are rotated
    kept: int = 0
    days: list[DayOutcome] = field(default_factory=list)

    def of(self, action: str) -> list[DayOutcome]:
        return [outcome for outcome in self.days if outcome.action == action]

    @property
    def errors(self) -> list[DayOutcome]:
        return self.of(ERROR)

    def summary(self) -> dict[str, Any]:
        return {"cutoff": self.cutoff, "kept_days": self.kept, "archived_days": len(self.of(ARCHIVED)),
                "deleted_days": len(self.of(DELETED)), "held_days": len(self.of(HELD)),
                "errors": len(self.errors), "files": sum(o.files for o in self.days if o.action in (ARCHIVED, DELETED)),
                "bytes": sum(o.bytes for o in self.days if o.action in (ARCHIVED, DELETED))}


def rotate_lake(root: Path, *, today: date, retention_days: int, mode: str,
                archive_root: Path | None = None) -> RotationReport:
    _validate(root, retention_days, mode, archive_root)
    cutoff = today - timedelta(days=retention_days)
    report = RotationReport(cutoff.isoformat())
    for day, day_dir in day_partitions(root):
        if day >= cutoff:  # cutoff < today, so today and later always land here
            report.kept += 1
            continue
        files = [path for path in day_dir.rglob("*") if path.is_file()]
        size = sum(path.stat().st_size for path in files)
        try:
            with ExitStack() as locks:
                for path in files:
                    if path.name.endswith(JSONL_SUFFIX):
                        locks.enter_context(writer_lock(path))
                if mode == MODE_ARCHIVE:
                    assert archive_root is not None  # checked by _validate
                    _archive_day(day_dir, archive_root / day_dir.name)
                    action = ARCHIVED
                else:
                    shutil.rmtree(day_dir)
                    action = DELETED
            fsync_dir(root)
        except LakeLockedError as exc:
            report.days.append(DayOutcome(day.isoformat(), HELD, detail=f"a writer holds {exc.filename}"))
            continue
        except (RotationError, OSError) as exc:
            report.days.append(DayOutcome(day.isoformat(), ERROR, detail=str(exc)))
            continue
        report.days.append(DayOutcome(day.isoformat(), action, len(files), size))
    return report


def _validate(root: Path, retention_days: int, mode: str, archive_root: Path | None) -> None:
    if type(retention_days) is not int or retention_days < 1:
        raise ValueError(f"retention_days={retention_days!r}: allowed is an integer >= 1 "
                         "(today's partition is always kept, plus this many days before it)")
    if mode not in (MODE_ARCHIVE, MODE_DELETE):
        raise ValueError(f"mode={mode!r}: allowed are {MODE_ARCHIVE!r} and {MODE_DELETE!r}")
    if mode == MODE_ARCHIVE:
        if archive_root is None:
            raise ValueError("mode 'archive' needs an archive root")
        if is_within(archive_root, root) or is_within(root, archive_root):
            raise ValueError(f"archive root {archive_root} and lake {root} must not contain one another")


def _archive_day(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        _merge_into(source, target)
        return
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        partial = target.with_name(f".{target.name}.partial")  # ours: left by an interrupted copy
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial, copy_function=lambda s, d: copy_durable(Path(s), Path(d)))
        fsync_tree(partial)
        os.rename(partial, target)
        shutil.rmtree(source)
    fsync_dir(target.parent)


def _merge_into(source: Path, target: Path) -> None:
    conflicts: list[str] = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        relative = path.relative_to(source)
        destination = target / relative
        if destination.exists():
            if file_digest(destination) == file_digest(path):
                path.unlink()
            else:
                conflicts.append(str(relative))
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        _move_file(path, destination)
    if conflicts:
        raise RotationError(f"{target} already has different files {', '.join(conflicts)}; the day stays in the "
                            "lake until they are reconciled by hand")
    shutil.rmtree(source)  # only emptied directories are left
    fsync_tree(target)


def _move_file(source: Path, target: Path) -> None:
    try:
        os.rename(source, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    partial = target.with_name(f".{target.name}.partial")
    copy_durable(source, partial)
    os.rename(partial, target)
    source.unlink()
