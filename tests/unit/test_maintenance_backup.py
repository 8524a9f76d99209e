"""Backup of a temporary lake (no Redis here; see tests/integration/test_maintenance_flows.py):
manifest, restore check, byte-identical restore, idempotence, damage detection."""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path

import orjson
import pytest

from trading.lake import LakeWriter
from trading.maintenance.__main__ import main
from trading.maintenance.backup import MANIFEST, BackupError, backup_path, make_backup, read_manifest
from trading.maintenance.compaction import compact_lake
from trading.maintenance.fsutil import file_digest
from trading.maintenance.restore import check_backup, restore_lake

T0 = 1_758_600_000_000  # 2025-09-23T04:00:00Z
HOUR = 3_600_000
DAY = date(2025, 9, 23)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    """Compacted Parquet, a hot JSONL, a quarantine file, a gap ledger and a decision record."""
    root = tmp_path / "lake"
    with LakeWriter(root, "orderbook/update") as writer:
        writer.write_batch([{"recv_ts": T0 + i, "market": "BTC-EUR", "bid": "75516.1", "nonce": i}
                            for i in range(50)])
        writer.write_batch([{"recv_ts": T0 + HOUR + i, "market": "ETH-EUR", "nonce": i} for i in range(7)])
        old = writer.path_for(T0)
    with open(old, "ab") as file:
        file.write(b'{"recv_ts":17586')  # torn: quarantined by compaction
    compact_lake(root, now_ms=T0 + HOUR + 1_800_000, grace_ms=900_000, daily_grace_ms=0)
    with LakeWriter(root, "gaps/orderbook/update", hourly=False, time_fields=("start_ts",)) as ledger:
        ledger.write_batch([{"v": 1, "kind": "resync", "start_ts": T0, "end_ts": T0 + 9}])
    (root / "decisions").mkdir()
    (root / "decisions" / "go-live-2025-09-23T0700Z.md").write_text("# GO\noperator: alice\n")
    return root


def test_backup_manifest_covers_every_file_and_the_restore_check_passes(lake: Path, tmp_path: Path) -> None:
    report = make_backup(lake, tmp_path / "backups", day=DAY, now_ms=T0, redis_client=None)

    assert report.created and report.path == tmp_path / "backups" / "2025-09-23"
    manifest = read_manifest(report.path)
    listed = {entry["path"]: (entry["size"], entry["sha256"]) for entry in manifest["files"]}
    assert set(listed) == {f"lake/{relative}" for relative in tree(lake)}
    for relative, (size, sha256) in listed.items():
        digest = file_digest(lake / relative.removeprefix("lake/"))
        assert (digest.size, digest.sha256) == (size, sha256)
    assert report.decision_records == 1 and report.redis_keys is None and manifest["redis"] is None
    assert any(path.endswith(".parquet") for path in listed) and any(path.endswith(".quarantine") for path in listed)

    check = check_backup(report.path)
    assert check.ok, check.problems
    assert (check.parquet_files, check.parquet_rows) == (1, 50)
    assert (check.jsonl_files, check.jsonl_rows) == (2, 8)  # the hot hour and the gap ledger
    assert check.files_checked == len(listed)


def test_a_backup_restores_byte_identical(lake: Path, tmp_path: Path) -> None:
    report = make_backup(lake, tmp_path / "backups", day=DAY, now_ms=T0, redis_client=None)
    target = tmp_path / "restored"

    assert restore_lake(report.path, target) == len(tree(lake))
    assert tree(target) == tree(lake)
    assert restore_lake(report.path, target) == 0  # again: everything is there already


def test_restore_refuses_to_overwrite_different_files(lake: Path, tmp_path: Path) -> None:
    report = make_backup(lake, tmp_path / "backups", day=DAY, now_ms=T0, redis_client=None)
    target = tmp_path / "restored"
    decision = target / "decisions" / "go-live-2025-09-23T0700Z.md"
    decision.parent.mkdir(parents=True)
    decision.write_text("something else\n")
    with pytest.raises(BackupError, match="already has different files"):
        restore_lake(report.path, target)
    assert tree(target) == {"decisions/go-live-2025-09-23T0700Z.md": b"something else\n"}


def test_running_the_same_days_backup_again_changes_nothing(lake: Path, tmp_path: Path) -> None:
    first = make_backup(lake, tmp_path / "backups", day=DAY, now_ms=T0, redis_client=None)
    snapshot = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.path.rglob("*") if p.is_file()}
    with LakeWriter(lake, "ticker24h") as writer:  # the lake moves on
        writer.write_batch([{"recv_ts": T0, "last": "1"}])

    again = make_backup(lake, tmp_path / "backups", day=DAY, now_ms=T0 + 1, redis_client=None)

    assert not again.created and again.path == first.path and again.files == first.files
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.path.rglob("*") if p.is_file()} == snapshot
    assert sorted(p.name for p in (tmp_path / "backups").iterdir()) == ["2025-09-23"]


def test_the_restore_check_detects_a_flipped_byte_a_missing_and_an_extra_file(lake: Path, tmp_path: Path) -> None:
    report = make_backup(lake, tmp_path / "backups", day=DAY, now_ms=T0, redis_client=None)
    parquet = next(report.path.rglob("*.parquet"))
    data = bytearray(parquet.read_bytes())
    data[len(data) // 2] ^= 0x01
    parquet.write_bytes(bytes(data))
    (report.path / "lake" / "decisions" / "go-live-2025-09-23T0700Z.md").unlink()
    (report.path / "lake" / "stray.txt").write_text("?")

    check = check_backup(report.path)

    assert not check.ok
    relative = parquet.relative_to(report.path).as_posix()
    assert any(p.startswith(f"{relative}: size/sha256") and "damaged" in p for p in check.problems)
    assert "lake/decisions/go-live-2025-09-23T0700Z.md: in the manifest but missing" in check.problems
    assert "lake/stray.txt: present but not in the manifest" in check.problems
    assert len(check.problems) == 3


def test_a_damaged_manifest_fails_the_check(lake: Path, tmp_path: Path) -> None:
    report = make_backup(lake, tmp_path / "backups", day=DAY, now_ms=T0, redis_client=None)
    manifest = orjson.loads((report.path / MANIFEST).read_bytes())
    manifest["files"][0]["path"] = "../outside"
    (report.path / MANIFEST).write_bytes(orjson.dumps(manifest))
    check = check_backup(report.path)
    assert not check.ok and "not a relative path inside the backup" in check.problems[0]
    (report.path / MANIFEST).unlink()
    assert "missing" in check_backup(report.path).problems[0]


def test_an_interrupted_backup_never_looks_complete_and_is_redone(lake: Path, tmp_path: Path) -> None:
    root = tmp_path / "backups"
    partial = root / ".2025-09-23.partial"
    (partial / "lake").mkdir(parents=True)
    (partial / "lake" / "half-copied.parquet").write_bytes(b"PAR")
    assert not backup_path(root, DAY).exists()

    report = make_backup(lake, root, day=DAY, now_ms=T0, redis_client=None)

    assert report.created and not partial.exists()
    assert check_backup(report.path).ok
    assert sorted(p.name for p in root.iterdir()) == ["2025-09-23"]


def test_a_directory_for_the_day_without_manifest_is_an_error(lake: Path, tmp_path: Path) -> None:
    (tmp_path / "backups" / "2025-09-23").mkdir(parents=True)
    with pytest.raises(BackupError, match="not a complete backup"):
        make_backup(lake, tmp_path / "backups", day=DAY, now_ms=T0, redis_client=None)


def test_hot_file_copied_mid_write_is_readable(lake: Path, tmp_path: Path) -> None:
    hot = next(lake.rglob("orderbook-update.*T05.jsonl"))
    with open(hot, "ab") as file:
        file.write(b'{"recv_ts":1758')  # a writer is in the middle of a line
    report = make_backup(lake, tmp_path / "backups", day=DAY, now_ms=T0, redis_client=None)
    check = check_backup(report.path)
    assert check.ok and check.torn_tails == 1 and check.jsonl_rows == 8


@pytest.mark.parametrize("placement", ["inside the lake", "around the lake"])
def test_backup_root_and_lake_must_not_contain_one_another(lake: Path, placement: str) -> None:
    root = lake / "backups" if placement == "inside the lake" else lake.parent
    with pytest.raises(BackupError, match="must not contain one another"):
        make_backup(lake, root, day=DAY, now_ms=T0, redis_client=None)
    assert not (lake / "backups").exists() and not (root / "2025-09-23").exists()


def test_the_check_reads_parquet_back_not_only_checksums(lake: Path, tmp_path: Path) -> None:
    report = make_backup(lake, tmp_path / "backups", day=DAY, now_ms=T0, redis_client=None)
    parquet = next(report.path.rglob("*.parquet"))
    parquet.write_bytes(parquet.read_bytes()[:-20])  # footer gone, and the manifest made to agree
    manifest = orjson.loads((report.path / MANIFEST).read_bytes())
    relative = parquet.relative_to(report.path).as_posix()
    digest = file_digest(parquet)
    for entry in manifest["files"]:
        if entry["path"] == relative:
            entry.update(size=digest.size, sha256=digest.sha256)
    (report.path / MANIFEST).write_bytes(orjson.dumps(manifest))

    check = check_backup(report.path)

    assert [p.split(": ")[:2] for p in check.problems] == [[relative, "cannot be read back"]]


def test_a_missing_lake_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="PARQUET_DIR"):
        make_backup(tmp_path / "nope", tmp_path / "backups", day=DAY, now_ms=T0, redis_client=None)
    assert not os.path.exists(tmp_path / "backups")


def test_the_command_line_checks_and_restores_by_hand(lake: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    report = make_backup(lake, tmp_path / "backups", day=DAY, now_ms=T0, redis_client=None)
    assert main(["check", str(report.path)]) == 0
    assert orjson.loads(capsys.readouterr().out)["ok"] is True
    assert main(["lake", str(report.path), str(tmp_path / "restored")]) == 0
    assert orjson.loads(capsys.readouterr().out) == {"files_restored": len(tree(lake))}
    assert tree(tmp_path / "restored") == tree(lake)
    (report.path / "lake" / "decisions" / "go-live-2025-09-23T0700Z.md").write_text("# NO-GO\n")
    assert main(["check", str(report.path)]) == 1
    assert "damaged" in orjson.loads(capsys.readouterr().out)["problems"][0]
    assert main(["redis", str(report.path)]) == 1
    assert "set REDIS_URL" in capsys.readouterr().err  # never a URL (it may hold a password) on the command line
