"""Rotation on a temporary lake: today and newer are never touched; archive vs delete; idempotent."""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import date, timedelta
from pathlib import Path

import pytest

from trading.lake import LakeWriter
from trading.maintenance.rotation import (
    ARCHIVED,
    DELETED,
    ERROR,
    HELD,
    MODE_ARCHIVE,
    MODE_DELETE,
    rotate_lake,
)

TODAY = date(2025, 9, 23)


def make_day(root: Path, day: date, payload: bytes = b'{"recv_ts":1}\n') -> Path:
    hot = root / day.isoformat() / "ticker24h" / f"ticker24h.{day.isoformat()}T04.jsonl"
    hot.parent.mkdir(parents=True)
    hot.write_bytes(payload)
    compacted = root / day.isoformat() / "ticker24h" / f"ticker24h.{day.isoformat()}T03.parquet"
    compacted.write_bytes(b"PAR1 " + day.isoformat().encode())
    return root / day.isoformat()


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    root = tmp_path / "lake"
    for offset in (-1, 0, 1, 2, 3, 10):  # tomorrow, today, and older days
        make_day(root, TODAY - timedelta(days=offset))
    (root / "decisions").mkdir()
    (root / "decisions" / "go-live-2025-09-01.md").write_text("GO\n")
    return root


def test_archive_moves_older_days_whole_and_keeps_today_and_newer(lake: Path, tmp_path: Path) -> None:
    archive = tmp_path / "lake-archive"
    before = tree(lake)

    report = rotate_lake(lake, today=TODAY, retention_days=2, mode=MODE_ARCHIVE, archive_root=archive)

    assert report.cutoff == "2025-09-21" and report.kept == 4
    assert [(o.day, o.action, o.files) for o in report.days] == [("2025-09-13", ARCHIVED, 2),
                                                                   ("2025-09-20", ARCHIVED, 2)]
    assert sorted(p.name for p in lake.iterdir()) == ["2025-09-21", "2025-09-22", "2025-09-23", "2025-09-24",
                                                      "decisions"]
    moved = {**tree(lake), **tree(archive)}
    assert moved == before  # every byte is still somewhere: nothing lost, nothing altered


def test_delete_removes_older_days_only(lake: Path) -> None:
    report = rotate_lake(lake, today=TODAY, retention_days=1, mode=MODE_DELETE)
    assert [(o.day, o.action) for o in report.days] == [("2025-09-13", DELETED), ("2025-09-20", DELETED),
                                                        ("2025-09-21", DELETED)]
    assert sorted(p.name for p in lake.iterdir()) == ["2025-09-22", "2025-09-23", "2025-09-24", "decisions"]


def test_archive_on_another_file_system_copies_then_removes(lake: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(lake).st_dev:
        pytest.skip("needs /dev/shm on a file system other than the test's temporary directory")
    archive = Path(tempfile.mkdtemp(prefix="lake-archive-", dir=shm))
    try:
        before = tree(lake)
        report = rotate_lake(lake, today=TODAY, retention_days=2, mode=MODE_ARCHIVE, archive_root=archive)
        assert [o.action for o in report.days] == [ARCHIVED, ARCHIVED]
        assert {**tree(lake), **tree(archive)} == before
        assert not list(archive.glob(".*.partial"))
    finally:
        shutil.rmtree(archive)


def test_a_second_run_changes_nothing(lake: Path, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    rotate_lake(lake, today=TODAY, retention_days=1, mode=MODE_ARCHIVE, archive_root=archive)
    lake_before, archive_before = tree(lake), tree(archive)
    report = rotate_lake(lake, today=TODAY, retention_days=1, mode=MODE_ARCHIVE, archive_root=archive)
    assert report.days == [] and (tree(lake), tree(archive)) == (lake_before, archive_before)


def test_today_survives_the_shortest_retention(tmp_path: Path) -> None:
    root = tmp_path / "lake"
    make_day(root, TODAY)
    make_day(root, TODAY - timedelta(days=1))
    report = rotate_lake(root, today=TODAY, retention_days=1, mode=MODE_DELETE)
    assert report.days == [] and report.kept == 2


def test_a_day_a_writer_still_holds_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "lake"
    old = TODAY - timedelta(days=5)
    make_day(root, old)
    writer = LakeWriter(root, "gaps/ticker24h", hourly=False)
    try:
        midnight = (old - date(1970, 1, 1)).days * 86_400_000
        writer.write_batch([{"start_ts": midnight + 1}], ts_ms=midnight + 1)
        report = rotate_lake(root, today=TODAY, retention_days=1, mode=MODE_DELETE)
        assert [o.action for o in report.days] == [HELD] and (root / old.isoformat()).exists()
    finally:
        writer.close()
    assert [o.action for o in rotate_lake(root, today=TODAY, retention_days=1, mode=MODE_DELETE).days] == [DELETED]


def test_late_files_merge_into_an_archived_day_and_conflicts_stay(tmp_path: Path) -> None:
    root, archive = tmp_path / "lake", tmp_path / "archive"
    old = TODAY - timedelta(days=5)
    make_day(root, old)
    rotate_lake(root, today=TODAY, retention_days=1, mode=MODE_ARCHIVE, archive_root=archive)
    late = root / old.isoformat() / "gaps" / "x.jsonl"  # appeared after the day was archived
    late.parent.mkdir(parents=True)
    late.write_bytes(b'{"start_ts":2}\n')
    identical = root / old.isoformat() / "ticker24h" / f"ticker24h.{old.isoformat()}T03.parquet"
    identical.parent.mkdir(parents=True)
    identical.write_bytes(b"PAR1 " + old.isoformat().encode())

    report = rotate_lake(root, today=TODAY, retention_days=1, mode=MODE_ARCHIVE, archive_root=archive)

    assert [o.action for o in report.days] == [ARCHIVED] and not (root / old.isoformat()).exists()
    assert (archive / old.isoformat() / "gaps" / "x.jsonl").read_bytes() == b'{"start_ts":2}\n'

    conflicting = root / old.isoformat() / "ticker24h" / f"ticker24h.{old.isoformat()}T04.jsonl"
    conflicting.parent.mkdir(parents=True)
    conflicting.write_bytes(b'{"recv_ts":99}\n')
    report = rotate_lake(root, today=TODAY, retention_days=1, mode=MODE_ARCHIVE, archive_root=archive)
    assert [o.action for o in report.days] == [ERROR] and "already has different files" in report.days[0].detail
    assert conflicting.read_bytes() == b'{"recv_ts":99}\n'
    assert (archive / old.isoformat() / "ticker24h" / conflicting.name).read_bytes() == b'{"recv_ts":1}\n'


@pytest.mark.parametrize(("retention", "mode", "archive", "message"), [
    (0, MODE_DELETE, None, "retention_days=0"),
    (-3, MODE_DELETE, None, "retention_days=-3"),
    (2, "shred", None, "mode='shred'"),
    (2, MODE_ARCHIVE, None, "needs an archive root"),
    (2, MODE_ARCHIVE, "lake/archive", "must not contain one another"),
])
def test_bad_parameters_are_refused_before_anything_moves(lake: Path, retention: int, mode: str,
                                                          archive: str | None, message: str) -> None:
    before = tree(lake)
    with pytest.raises(ValueError, match=message):
        rotate_lake(lake, today=TODAY, retention_days=retention, mode=mode,
                    archive_root=None if archive is None else lake.parent / archive)
    assert tree(lake) == before
