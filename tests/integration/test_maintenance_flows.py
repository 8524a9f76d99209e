"""The maintenance flows against a real Prefect server and real Redis, and the Redis half of
backup and restore (DUMP/RESTORE through real redis-servers)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import redis

from trading.clock import now_ms
from trading.lake import HOUR_MS, LakeWriter, utc_day
from trading.maintenance.backup import MANIFEST, REDIS_SNAPSHOT, make_backup
from trading.maintenance.fsutil import file_digest
from trading.maintenance.redis_snapshot import url_with_db
from trading.maintenance.restore import check_backup, restore_lake, restore_snapshot
from trading.preflight import Status
from trading.redis_conn import EmbeddedRedis


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def latest_table(key: str) -> list[dict[str, Any]]:
    from prefect.artifacts import Artifact

    artifact = Artifact.get(key)
    assert artifact is not None, f"no artifact {key!r}"
    data = artifact.data
    rows: list[dict[str, Any]] = json.loads(data) if isinstance(data, str) else data
    return rows


def fill_redis(client: redis.Redis) -> None:
    client.xadd("bitvavo:book", {"market": "BTC-EUR", "bid": "75516.1", "ask": "75517.3"})
    client.xadd("bitvavo:book", {"market": "ETH-EUR", "bid": "2512.01", "ask": "2512.5"})
    client.hset("trading:pnl:paper", mapping={"realized": "12.5", "fees": "0.31"})
    client.set("trading:kill", "0", px=3_600_000)


@pytest.fixture
def lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "lake"
    monkeypatch.setenv("PARQUET_DIR", str(root))
    monkeypatch.delenv("REDIS_URL", raising=False)
    return root


@pytest.fixture
def scratch_db_url(redis_db_url: str) -> Iterator[str]:
    """Another, empty DB of the test's Redis server."""
    db = int(urlsplit(redis_db_url).path.lstrip("/")) % 15 + 1
    url = url_with_db(redis_db_url, db)
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
        yield url
        client.flushdb()
    finally:
        client.close()


def write_hour(root: Path, channel: str, ts: int, rows: int) -> Path:
    with LakeWriter(root, channel) as writer:
        writer.write_batch([{"recv_ts": ts, "market": "BTC-EUR", "bid": f"7551{i}.1", "nonce": i}
                            for i in range(rows)])
        return writer.path_for(ts)


@pytest.mark.usefixtures("prefect_api")
def test_compaction_flow_compacts_closed_hours_once_and_reports(lake: Path) -> None:
    from flows.maintenance import lake_compaction

    closed = write_hour(lake, "orderbook/update", now_ms() - 2 * HOUR_MS, 30)
    current = write_hour(lake, "orderbook/update", now_ms(), 5)

    summary = lake_compaction()

    assert (summary["compacted"], summary["rows_compacted"], summary["not_closed"]) == (1, 30, 1)
    assert not closed.exists() and closed.with_suffix(".parquet").exists() and current.exists()
    table = latest_table("lake-compaction")
    assert [(row["path"], row["action"], row["rows"]) for row in table] == [
        (str(closed.relative_to(lake)), "compacted", 30)]
    before = tree(lake)
    assert lake_compaction()["compacted"] == 0 and tree(lake) == before


@pytest.mark.usefixtures("prefect_api")
def test_a_late_compaction_run_skips_and_says_so(lake: Path) -> None:
    from flows.maintenance import lake_compaction

    closed = write_hour(lake, "ticker24h", now_ms() - 2 * HOUR_MS, 3)
    summary = lake_compaction(max_lateness_s=0)  # any delay after the scheduled start is "late"
    assert summary["skipped"] is True and summary["lateness_s"] >= 0
    assert closed.exists()
    assert latest_table("lake-compaction")[0]["action"] == "skipped"


@pytest.mark.usefixtures("prefect_api")
def test_rotation_flow_archives_old_days_and_keeps_today(lake: Path) -> None:
    from flows.maintenance import lake_rotation

    today = utc_day(now_ms())
    kept = write_hour(lake, "ticker24h", now_ms(), 2)
    old_ts = now_ms() - 10 * 24 * HOUR_MS
    old = write_hour(lake, "ticker24h", old_ts, 2)
    old_bytes = old.read_bytes()

    summary = lake_rotation(retention_days=3)

    assert (summary["archived_days"], summary["kept_days"], summary["today"]) == (1, 1, str(today))
    archived = lake.parent / "lake-archive" / old.relative_to(lake)
    assert archived.read_bytes() == old_bytes and not old.exists() and kept.exists()
    assert summary["cutoff"] == str(today - timedelta(days=3))
    assert [(row["day"], row["action"]) for row in latest_table("lake-rotation")] == [
        (str(utc_day(old_ts)), "archived")]
    assert lake_rotation(retention_days=3)["archived_days"] == 0


@pytest.mark.usefixtures("prefect_api")
def test_backup_flow_backs_up_lake_decisions_and_redis_and_restores_them(
        lake: Path, tmp_path: Path, redis_db_url: str, scratch_db_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.maintenance import backup

    write_hour(lake, "orderbook/update", now_ms() - 2 * HOUR_MS, 20)
    (lake / "decisions").mkdir()
    (lake / "decisions" / "go-live.md").write_text("# GO\n")
    monkeypatch.setenv("REDIS_URL", redis_db_url)
    source = redis.Redis.from_url(redis_db_url)
    try:
        fill_redis(source)
        scratch_db = int(urlsplit(scratch_db_url).path.lstrip("/"))

        summary = backup(backup_dir=str(tmp_path / "backups"), scratch_redis_db=scratch_db)

        assert summary["created"] and summary["redis_keys"] == 3 and summary["decision_records"] == 1
        check = summary["restore_check"]
        assert check["ok"] and check["redis_keys_restored"] == 3 and check["jsonl_rows"] == 20
        table = {row["what"]: row for row in latest_table("backup")}
        assert table["restore check"]["value"] == "ok" and table["redis keys"]["value"] == 3

        backup_dir = Path(summary["backup"])
        snapshot_before = tree(backup_dir)
        source.set("new-key", "1")
        again = backup(backup_dir=str(tmp_path / "backups"), scratch_redis_db=scratch_db)
        assert not again["created"] and again["restore_check"]["ok"] and tree(backup_dir) == snapshot_before

        restored_lake = tmp_path / "restored"
        restore_lake(backup_dir, restored_lake)
        assert tree(restored_lake) == tree(lake)
        target = redis.Redis.from_url(scratch_db_url)
        try:
            assert target.dbsize() == 0  # the restore check left the scratch DB as it found it
            assert restore_snapshot(backup_dir, target) == 3
            for key in (b"bitvavo:book", b"trading:pnl:paper", b"trading:kill"):
                assert target.dump(key) == source.dump(key), key  # byte-identical values
            assert 0 < target.pttl("trading:kill") <= 3_600_000
        finally:
            target.close()
    finally:
        source.close()


@pytest.fixture
def lake_settings_block(lake: Path, tmp_path: Path) -> Iterator[Path]:
    """A saved `lake-settings/default` block for this test's lake; its backups and archive under `ops/`."""
    from blocks.lake import LakeSettings

    ops = tmp_path / "ops"
    LakeSettings(parquet_dir=str(lake), backup_dir=str(ops / "backups"), archive_dir=str(ops / "archive"),
                 retention_days=2).save("default", overwrite=True)
    try:
        yield ops
    finally:
        LakeSettings.delete("default")


@pytest.mark.usefixtures("prefect_api")
def test_without_a_block_backups_go_beside_the_lake(lake: Path) -> None:
    from flows.maintenance import backup

    write_hour(lake, "ticker24h", now_ms() - 2 * HOUR_MS, 2)
    summary = backup()
    assert Path(summary["backup"]).parent == lake.parent / "lake-backup" and summary["restore_check"]["ok"]


@pytest.mark.usefixtures("prefect_api")
async def test_the_lake_settings_block_is_where_backup_rotation_and_preflight_look(
        lake: Path, lake_settings_block: Path) -> None:
    from blocks.lake import alake_paths
    from flows.maintenance import backup, lake_rotation
    from flows.preflight import _last_backup_restores

    write_hour(lake, "ticker24h", now_ms(), 2)
    old = write_hour(lake, "ticker24h", now_ms() - 5 * 24 * HOUR_MS, 2)

    rotated = lake_rotation()  # the block's retention (2 days) and archive
    assert rotated["archived_days"] == 1 and rotated["archive"] == str(lake_settings_block / "archive")
    assert (lake_settings_block / "archive" / old.relative_to(lake)).exists()
    backed_up = Path(backup()["backup"])
    assert backed_up.parent == lake_settings_block / "backups"

    paths = await alake_paths(lake)  # what preflight's backup check reads
    assert paths.backup == lake_settings_block / "backups"
    check = _last_backup_restores(paths.backup, not_due=False, live=False)
    assert check.status is Status.PASS and backed_up.name in check.detail


@pytest.mark.usefixtures("prefect_api")
def test_a_block_naming_another_lake_stops_maintenance(lake: Path, tmp_path: Path) -> None:
    from blocks.lake import LakeSettings, LakeSettingsMismatchError
    from flows.maintenance import lake_compaction

    LakeSettings(parquet_dir=str(tmp_path / "elsewhere")).save("default", overwrite=True)
    try:
        with pytest.raises(LakeSettingsMismatchError, match="PARQUET_DIR"):
            lake_compaction()
    finally:
        LakeSettings.delete("default")


def test_restore_check_uses_a_private_server_and_redis_refuses_a_damaged_payload(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    write_hour(lake, "ticker24h", now_ms() - 2 * HOUR_MS, 2)
    server = EmbeddedRedis()  # the source runs the same redis-server binary as the private scratch
    server.start()
    try:
        source = redis.Redis.from_url(server.url)
        fill_redis(source)
        report = make_backup(lake, tmp_path / "backups", day=utc_day(now_ms()), now_ms=now_ms(),
                             redis_client=source)
        check = check_backup(report.path)
        assert check.ok, check.problems
        assert check.redis_keys_restored == 3

        busy = check_backup(report.path, scratch=source)  # a scratch DB with data is never written to
        assert busy.problems == ["the scratch Redis DB is not empty; the snapshot was not restored into it"]
        assert source.dbsize() == 3
        source.close()
    finally:
        server.stop()

    snapshot = report.path / REDIS_SNAPSHOT
    records = [orjson.loads(line) for line in snapshot.read_bytes().splitlines()]
    payload = bytearray(base64.b64decode(records[0]["dump"]))
    payload[0] ^= 0x01  # the sha256 in the manifest is updated to match: only Redis's own CRC64 can tell
    records[0]["dump"] = base64.b64encode(bytes(payload)).decode()
    snapshot.write_bytes(b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in records))
    manifest = orjson.loads((report.path / MANIFEST).read_bytes())
    digest = file_digest(snapshot)
    for entry in manifest["files"]:
        if entry["path"] == REDIS_SNAPSHOT:
            entry.update(size=digest.size, sha256=digest.sha256)
    (report.path / MANIFEST).write_bytes(orjson.dumps(manifest))

    damaged = check_backup(report.path)

    assert len(damaged.problems) == 1 and "RESTORE of key 1 refused" in damaged.problems[0]
