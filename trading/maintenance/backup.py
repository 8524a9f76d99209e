"""Backup: the lake, the decision records and a Redis snapshot, with a manifest of checksums.

    <backup root>/<YYYY-MM-DD>/manifest.json        format, day, created_ms, redis facts, files[]
                              lake/...               every file under the lake root, same paths:
                                                     Parquet, hot JSONL, quarantine files, the gap
                                                     ledger and the decision records (decisions/)
                              redis/keys.jsonl       DUMP of every key (redis_snapshot.py)

Each backup is a full copy (self-contained: one damaged backup never spoils another). It is
assembled in `<root>/.<day>.partial`, every file and directory fsynced, then renamed into place,
so a directory named after a day is always complete. One backup per UTC day: when today's
exists, a new run changes nothing and reports it. The manifest lists every file except itself
with its size and sha256 (of the bytes copied, so a hot file still growing is consistent).
Compaction temp files (`*.tmp`) are not copied; a JSONL that compaction turns into Parquet
while the backup runs is replaced by that Parquet.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import redis

from trading.lake import JSONL_SUFFIX
from trading.maintenance.compaction import parquet_path
from trading.maintenance.fsutil import copy_durable, file_digest, fsync_dir, fsync_tree, is_within
from trading.maintenance.redis_snapshot import dump_redis, server_version

MANIFEST = "manifest.json"
LAKE_DIR = "lake"
REDIS_SNAPSHOT = "redis/keys.jsonl"
DECISIONS_DIR = "decisions"
MANIFEST_FORMAT = 1
_TEMP_SUFFIX = ".tmp"


class BackupError(RuntimeError):
    pass


@dataclass(frozen=True)
class BackupReport:
    path: Path
    created: bool  # False: today's backup existed and nothing was changed
    files: int
    bytes: int
    lake_files: int
    decision_records: int
    redis_keys: int | None  # None: no Redis snapshot in this backup
    vanished: int = 0  # files that disappeared while being copied (compacted or rotated meanwhile)

    def summary(self) -> dict[str, Any]:
        return {"backup": str(self.path), "created": self.created, "files": self.files, "bytes": self.bytes,
                "lake_files": self.lake_files, "decision_records": self.decision_records,
                "redis_keys": self.redis_keys, "vanished": self.vanished}


def backup_path(backup_root: Path, day: date) -> Path:
    return backup_root / day.isoformat()


def read_manifest(backup_dir: Path) -> dict[str, Any]:
    path = backup_dir / MANIFEST
    try:
        manifest = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise BackupError(f"{path}: missing; {backup_dir} is not a complete backup") from None
    except orjson.JSONDecodeError as exc:
        raise BackupError(f"{path}: not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not isinstance(manifest.get("files"), list):
        raise BackupError(f"{path}: not a format {MANIFEST_FORMAT} backup manifest")
    return manifest


def make_backup(lake_root: Path, backup_root: Path, *, day: date, now_ms: int,
                redis_client: redis.Redis | None) -> BackupReport:
    """Back up the lake (and Redis, when a client is given; it must not decode responses)
    into `<backup_root>/<day>`, unless that backup exists already."""
    if not lake_root.is_dir():
        raise BackupError(f"lake root {lake_root} does not exist (check PARQUET_DIR)")
    if is_within(backup_root, lake_root) or is_within(lake_root, backup_root):
        raise BackupError(f"backup root {backup_root} and lake {lake_root} must not contain one another")
    final = backup_path(backup_root, day)
    if final.exists():
        return _existing(final)
    backup_root.mkdir(parents=True, exist_ok=True)
    partial = backup_root / f".{day.isoformat()}.partial"  # ours: left by an interrupted run
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    entries, vanished = _copy_lake(lake_root, partial / LAKE_DIR)
    redis_facts: dict[str, Any] | None = None
    if redis_client is not None:
        snapshot = partial / REDIS_SNAPSHOT
        snapshot.parent.mkdir(parents=True)
        keys = dump_redis(redis_client, snapshot)
        redis_facts = {"keys": keys, "server_version": server_version(redis_client)}
        entries.append(_entry(REDIS_SNAPSHOT, snapshot))
    manifest = {"format": MANIFEST_FORMAT, "day": day.isoformat(), "created_ms": now_ms,
                "lake_root": str(lake_root.resolve()), "redis": redis_facts, "files": entries}
    with open(partial / MANIFEST, "wb") as out:
        out.write(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        out.flush()
        os.fsync(out.fileno())
    fsync_tree(partial)
    os.rename(partial, final)
    fsync_dir(backup_root)
    return replace(_report(final, manifest, created=True), vanished=vanished)


def _copy_lake(lake_root: Path, target: Path) -> tuple[list[dict[str, Any]], int]:
    entries: dict[Path, dict[str, Any]] = {}

    def copy(path: Path) -> bool:
        relative = path.relative_to(lake_root)
        try:
            digest = copy_durable(path, target / relative)
        except FileNotFoundError:
            return False
        entries[path] = {"path": f"{LAKE_DIR}/{relative.as_posix()}", "size": digest.size, "sha256": digest.sha256}
        return True

    vanished = 0
    target.mkdir()
    for path in sorted(p for p in lake_root.rglob("*") if p.is_file() and not p.name.endswith(_TEMP_SUFFIX)):
        if path in entries or copy(path):
            continue
        # Gone since the listing: compaction may have turned it into a Parquet the listing predates.
        if path.suffix == JSONL_SUFFIX and (parquet_path(path) in entries or copy(parquet_path(path))):
            continue
        vanished += 1
    return sorted(entries.values(), key=lambda entry: str(entry["path"])), vanished


def _entry(relative: str, path: Path) -> dict[str, Any]:
    digest = file_digest(path)
    return {"path": relative, "size": digest.size, "sha256": digest.sha256}


def _existing(final: Path) -> BackupReport:
    try:
        manifest = read_manifest(final)
    except BackupError as exc:
        raise BackupError(f"{final} exists but is not a complete backup ({exc}); move it away to back up again"
                          ) from None
    return _report(final, manifest, created=False)


def _report(final: Path, manifest: dict[str, Any], *, created: bool) -> BackupReport:
    files = manifest["files"]
    lake = [f for f in files if str(f["path"]).startswith(f"{LAKE_DIR}/")]
    redis_facts = manifest.get("redis")
    return BackupReport(final, created, len(files), sum(int(f["size"]) for f in files), len(lake),
                        sum(1 for f in lake if str(f["path"]).startswith(f"{LAKE_DIR}/{DECISIONS_DIR}/")),
                        None if redis_facts is None else int(redis_facts["keys"]))
