"""The restore check and restores of a backup (backup.py).

`check_backup` proves a backup can be read back: every manifest entry exists with its size
and sha256 (and no file is unlisted), every Parquet is read in full and its row count matches
what compaction recorded, every lake JSONL parses (a torn last line of a hot file copied
mid-write is counted, not an error: the complete lines are all there), and the Redis snapshot
is RESTOREd key by key into a scratch Redis (Redis itself verifies each payload's checksum)
and the key count and types compared. The scratch is an empty DB the caller names, or a
private redis-server started for the check.

`restore_lake` and `restore_snapshot` put a backup back (docs/maintenance.md, runbook).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import redis

from trading.bus import as_text
from trading.lake import JSONL_SUFFIX, PARQUET_SUFFIX, LakeFormatError, TornTail, read_jsonl
from trading.maintenance.backup import LAKE_DIR, MANIFEST, REDIS_SNAPSHOT, BackupError, read_manifest
from trading.maintenance.fsutil import copy_durable, file_digest, fsync_tree
from trading.maintenance.parquet_rows import ParquetError, parquet_facts, read_row_count
from trading.maintenance.redis_snapshot import DumpedKey, RedisDumpError, restore_dump, server_version
from trading.redis_conn import EmbeddedRedis, sync_client

_DELETE_BATCH = 500


@dataclass
class RestoreCheck:
    backup: str
    files_checked: int = 0
    bytes_checked: int = 0
    parquet_files: int = 0
    parquet_rows: int = 0
    jsonl_files: int = 0
    jsonl_rows: int = 0
    torn_tails: int = 0
    redis_keys_restored: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        return {"backup": self.backup, "ok": self.ok, "files_checked": self.files_checked,
                "bytes_checked": self.bytes_checked, "parquet_files": self.parquet_files,
                "parquet_rows": self.parquet_rows, "jsonl_files": self.jsonl_files, "jsonl_rows": self.jsonl_rows,
                "torn_tails": self.torn_tails, "redis_keys_restored": self.redis_keys_restored,
                "problems": list(self.problems)}


def check_backup(backup_dir: Path, *, scratch: redis.Redis | None = None) -> RestoreCheck:
    """Read a backup back and compare it with its manifest; `scratch` (decode_responses=False)
    must be an empty DB, else a private redis-server is started for the Redis part."""
    check = RestoreCheck(str(backup_dir))
    try:
        manifest = read_manifest(backup_dir)
        listed = _listed_files(manifest)
    except BackupError as exc:
        check.problems.append(str(exc))
        return check
    present = {p.relative_to(backup_dir).as_posix() for p in backup_dir.rglob("*") if p.is_file()} - {MANIFEST}
    check.problems += [f"{path}: in the manifest but missing" for path in sorted(set(listed) - present)]
    check.problems += [f"{path}: present but not in the manifest" for path in sorted(present - set(listed))]
    intact: set[str] = set()
    for relative, (size, sha256) in sorted(listed.items()):
        if relative not in present:
            continue
        actual = _digest_of(backup_dir / relative)
        if actual != (size, sha256):
            check.problems.append(f"{relative}: size/sha256 {actual[0]}/{actual[1]} differ from the manifest "
                                  f"{size}/{sha256}: the copy is damaged")
            continue
        intact.add(relative)
        check.files_checked += 1
        check.bytes_checked += size
        if relative.startswith(f"{LAKE_DIR}/"):
            _read_back(backup_dir / relative, relative, check)
    redis_facts = manifest.get("redis")
    if redis_facts is not None and REDIS_SNAPSHOT in intact:
        _check_snapshot(backup_dir / REDIS_SNAPSHOT, redis_facts, scratch, check)
    elif redis_facts is not None and REDIS_SNAPSHOT not in listed:
        check.problems.append(f"{REDIS_SNAPSHOT}: the manifest records a Redis snapshot but does not list the file")
    return check


def _listed_files(manifest: dict[str, Any]) -> dict[str, tuple[int, str]]:
    listed: dict[str, tuple[int, str]] = {}
    for entry in manifest["files"]:
        try:
            relative, size, sha256 = str(entry["path"]), int(entry["size"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            raise BackupError(f"manifest entry {entry!r}: needs path, size and sha256") from None
        pure = PurePosixPath(relative)
        if pure.is_absolute() or ".." in pure.parts or relative == MANIFEST:
            raise BackupError(f"manifest entry {relative!r}: not a relative path inside the backup")
        listed[relative] = (size, sha256)
    return listed


def _read_back(path: Path, relative: str, check: RestoreCheck) -> None:
    try:
        if path.suffix == PARQUET_SUFFIX:
            rows = read_row_count(path)
            declared = parquet_facts(path).declared_rows
            if declared is not None and declared != rows:
                check.problems.append(f"{relative}: {rows} rows, compaction recorded {declared}")
            check.parquet_files += 1
            check.parquet_rows += rows
        elif path.name.endswith(JSONL_SUFFIX):

            def torn(_tail: TornTail) -> None:
                check.torn_tails += 1

            check.jsonl_rows += sum(1 for _ in read_jsonl(path, on_torn_tail=torn))
            check.jsonl_files += 1
    except (LakeFormatError, ParquetError, OSError) as exc:
        check.problems.append(f"{relative}: cannot be read back: {exc}")


def _check_snapshot(snapshot: Path, facts: dict[str, Any], scratch: redis.Redis | None,
                    check: RestoreCheck) -> None:
    with _scratch_client(scratch) as client:
        if client.dbsize():
            check.problems.append("the scratch Redis DB is not empty; the snapshot was not restored into it")
            return
        restored: list[DumpedKey] = []
        try:
            for item in restore_dump(client, snapshot):
                restored.append(item)
            wrong_type = [item.key for item in restored if as_text(client.type(item.key)) != item.type]
            if wrong_type:
                check.problems.append(f"{REDIS_SNAPSHOT}: {len(wrong_type)} keys restored with another type")
            if len(restored) != int(facts["keys"]) or client.dbsize() != len(restored):
                check.problems.append(f"{REDIS_SNAPSHOT}: {len(restored)} keys restored, the manifest says "
                                      f"{facts['keys']}")
            check.redis_keys_restored = len(restored)
        except RedisDumpError as exc:
            check.problems.append(str(exc))
        except redis.ResponseError as exc:
            check.problems.append(f"{REDIS_SNAPSHOT}: RESTORE of key {len(restored) + 1} refused: {exc} (snapshot "
                                  f"from redis {facts.get('server_version')}, scratch is redis "
                                  f"{server_version(client)}; an older scratch server cannot read a newer "
                                  "payload: name an empty DB on the source server as scratch)")
        finally:
            for start in range(0, len(restored), _DELETE_BATCH):
                client.delete(*(item.key for item in restored[start:start + _DELETE_BATCH]))


def _digest_of(path: Path) -> tuple[int, str]:
    digest = file_digest(path)
    return digest.size, digest.sha256



@contextmanager
def _scratch_client(scratch: redis.Redis | None) -> Iterator[redis.Redis]:
    if scratch is not None:
        yield scratch
        return
    server = EmbeddedRedis()
    server.start()
    client = sync_client(server.url, decode_responses=False)
    try:
        yield client
    finally:
        client.close()
        server.stop()


def restore_lake(backup_dir: Path, target: Path) -> int:
    """Copy the backup's lake files to `target`, each verified against the manifest. A file
    already there with the same bytes is left alone; one with other bytes stops the restore
    before anything is written. Returns the number of files written."""
    manifest = read_manifest(backup_dir)
    prefix = f"{LAKE_DIR}/"
    wanted = {relative[len(prefix):]: value for relative, value in _listed_files(manifest).items()
              if relative.startswith(prefix)}
    todo: dict[str, tuple[int, str]] = {}
    conflicts: list[str] = []
    for relative, (size, sha256) in sorted(wanted.items()):
        existing = target / relative
        if not existing.exists():
            todo[relative] = (size, sha256)
        elif _digest_of(existing) != (size, sha256):
            conflicts.append(relative)
    if conflicts:
        raise BackupError(f"{target} already has different files ({', '.join(conflicts[:5])}"
                          f"{' ...' if len(conflicts) > 5 else ''}); nothing was restored")
    for relative, (size, sha256) in todo.items():
        destination = target / relative
        temporary = destination.with_name(f".{destination.name}.restore.tmp")
        copied = copy_durable(backup_dir / LAKE_DIR / relative, temporary)
        if (copied.size, copied.sha256) != (size, sha256):
            temporary.unlink()
            raise BackupError(f"{LAKE_DIR}/{relative}: the backup copy does not match its manifest; run the "
                              "restore check")
        os.rename(temporary, destination)
    if target.is_dir():
        fsync_tree(target)
    return len(todo)


def restore_snapshot(backup_dir: Path, client: redis.Redis, *, replace: bool = False) -> int:
    """RESTORE the backup's Redis snapshot into `client`'s DB; returns the keys restored."""
    manifest = read_manifest(backup_dir)
    if manifest.get("redis") is None:
        raise BackupError(f"{backup_dir}: this backup has no Redis snapshot")
    return sum(1 for _ in restore_dump(client, backup_dir / REDIS_SNAPSHOT, replace=replace))
