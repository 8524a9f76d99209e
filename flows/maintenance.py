"""Maintenance deployments: `lake-compaction`, `lake-rotation`, `backup` (docs/maintenance.md).

Each flow reads `Settings.from_env()` and the lake's paths (`blocks.lake`: the `lake-settings`
block, or its defaults beside the lake), calls `trading.maintenance`, logs milestones, publishes a
table artifact of what it did and returns a summary dict. A run with errors publishes its
artifact first and then fails, so it stands out in the run history. Only the backup uses Redis, as
the `maintenance` user (blocks/runtime.py): the DUMP of every key, and the restore check's RESTORE
into `scratch_redis_db`.

Late runs (a run that starts more than `max_lateness_s` after its scheduled time, e.g. a backlog
after the worker was down): compaction skips and says so, because the next hourly run takes
every closed file anyway; rotation and backup still run and record the lateness, because their
work is defined by the time they actually run (today's retention, today's backup) and missing
a backup is the bigger risk. Re-runs are harmless either way: all three are idempotent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import redis
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from blocks.lake import lake_paths
from blocks.runtime import with_redis_user_sync
from flows.lateness import late_note, lateness_s
from trading.clock import now_ms
from trading.config import Settings
from trading.lake import utc_day
from trading.maintenance.backup import BackupReport, make_backup
from trading.maintenance.compaction import compact_lake
from trading.maintenance.redis_snapshot import url_with_db
from trading.maintenance.restore import RestoreCheck, check_backup
from trading.maintenance.rotation import rotate_lake
from trading.redis_conn import sync_client


class MaintenanceFailedError(RuntimeError):
    pass


def _lateness(logger: Any, flow_name: str, decision: str, max_lateness_s: int) -> tuple[float, bool]:
    """How late this run is, and whether that is beyond `max_lateness_s` (then logged with `decision`)."""
    lateness = lateness_s()
    late = lateness > max_lateness_s
    if late:
        logger.warning("%s %s: %s", flow_name, late_note(lateness, max_lateness_s), decision)
    return lateness, late


@flow(name="lake-compaction")
def lake_compaction(grace_s: int = 900, daily_grace_s: int = 21_600, max_lateness_s: int = 1_800) -> dict[str, Any]:
    """Closed hot JSONL files of the lake into zstd Parquet.

    Args:
        grace_s: an hourly file is compacted this long after its hour ended (and once no writer holds it).
        daily_grace_s: the same for daily files (the gap ledger, which backfills write late).
        max_lateness_s: a run starting later than this after its scheduled time skips.
    """
    _check_non_negative(grace_s=grace_s, daily_grace_s=daily_grace_s, max_lateness_s=max_lateness_s)
    logger = get_run_logger()
    lake = lake_paths(Settings.from_env().parquet_dir).lake  # a block naming another lake fails here
    lateness = lateness_s()
    if lateness > max_lateness_s:
        note = f"{late_note(lateness, max_lateness_s)}: skipped, the next on-time run compacts every closed file"
        logger.warning("lake-compaction %s", note)
        create_table_artifact(key="lake-compaction", table=[{"path": "", "action": "skipped", "rows": 0,
                                                             "detail": note}], description="late run: skipped")
        return {"skipped": True, "lateness_s": round(lateness, 1), "lake": str(lake)}
    logger.info("lake-compaction of %s (grace %d s, daily grace %d s)", lake, grace_s, daily_grace_s)
    report = compact_lake(lake, now_ms=now_ms(), grace_ms=grace_s * 1000, daily_grace_ms=daily_grace_s * 1000)
    summary = {"skipped": False, "lateness_s": round(lateness, 1), "lake": str(lake),
               **report.summary()}
    rows = [{"path": o.path, "action": o.action, "rows": o.rows, "detail": o.detail} for o in report.files]
    rows += [{"path": path, "action": "quarantine", "rows": 0, "detail": "torn lines kept as evidence"}
             for path in report.quarantine_files]
    create_table_artifact(key="lake-compaction", table=rows or [{"path": "", "action": "nothing to do", "rows": 0,
                                                                 "detail": f"{report.not_closed} files not closed"}],
                          description=_describe(summary, ("compacted", "finished", "rows_compacted", "held", "errors")))
    logger.info("lake-compaction: %s", _describe(summary, ("compacted", "finished", "rows_compacted", "held",
                                                           "not_closed", "torn_tails_quarantined", "errors")))
    if report.errors:
        raise MaintenanceFailedError(f"{len(report.errors)} files could not be compacted (their JSONL is kept): "
                                     + "; ".join(f"{o.path}: {o.detail}" for o in report.errors[:3]))
    return summary


@flow(name="lake-rotation")
def lake_rotation(retention_days: int | None = None, mode: Literal["archive", "delete"] = "archive",
                  archive_dir: str | None = None, max_lateness_s: int = 21_600) -> dict[str, Any]:
    """Lake retention: archive or delete day partitions older than the retention; today's never.

    Args:
        retention_days: days kept before today's partition (at least 1); empty: the lake-settings block's
            retention_days (default 7).
        mode: `archive` moves old day directories to `archive_dir`; `delete` removes them.
        archive_dir: where archived days go; empty: the lake-settings block's archive_dir (default beside the
            lake, `var/lake-archive`).
        max_lateness_s: a run starting later than this after its scheduled time still rotates, and says so.
    """
    _check_non_negative(max_lateness_s=max_lateness_s)
    logger = get_run_logger()
    paths = lake_paths(Settings.from_env().parquet_dir)
    lateness, late = _lateness(logger, "lake-rotation", "rotating anyway (retention counts from today)",
                               max_lateness_s)
    archive_root = Path(archive_dir) if archive_dir else paths.archive
    keep_days = paths.retention_days if retention_days is None else retention_days
    today = utc_day(now_ms())
    logger.info("lake-rotation of %s: keep %s and %d days before, %s older days%s (paths: %s)", paths.lake, today,
                keep_days, mode, f" to {archive_root}" if mode == "archive" else "", paths.source)
    report = rotate_lake(paths.lake, today=today, retention_days=keep_days, mode=mode,
                         archive_root=archive_root if mode == "archive" else None)
    summary = {"late": late, "lateness_s": round(lateness, 1), "lake": str(paths.lake), "today": str(today),
               "mode": mode, "archive": str(archive_root) if mode == "archive" else None, **report.summary()}
    rows = [{"day": o.day, "action": o.action, "files": o.files, "bytes": o.bytes, "detail": o.detail}
            for o in report.days]
    if late:
        rows.insert(0, {"day": "", "action": "late", "files": 0, "bytes": 0,
                        "detail": late_note(lateness, max_lateness_s)})
    create_table_artifact(key="lake-rotation", table=rows or [{"day": "", "action": "nothing to do", "files": 0,
                                                               "bytes": 0, "detail": f"cutoff {report.cutoff}"}],
                          description=_describe(summary, ("cutoff", "kept_days", "archived_days", "deleted_days",
                                                          "held_days", "errors")))
    logger.info("lake-rotation: %s", _describe(summary, ("cutoff", "kept_days", "archived_days", "deleted_days",
                                                         "held_days", "files", "bytes", "errors")))
    if report.errors:
        raise MaintenanceFailedError(f"{len(report.errors)} days could not be rotated (kept in the lake): "
                                     + "; ".join(f"{o.day}: {o.detail}" for o in report.errors[:3]))
    return summary


@flow(name="backup")
def backup(backup_dir: str | None = None, scratch_redis_db: int | None = None,
           max_lateness_s: int = 21_600) -> dict[str, Any]:
    """Today's backup of the lake, the decision records and Redis, then the restore check.

    Args:
        backup_dir: backup root, one directory per UTC day; empty: the lake-settings block's backup_dir
            (default beside the lake, `var/lake-backup`), which preflight's backup check reads too.
        scratch_redis_db: an empty DB on REDIS_URL's server for the restore check of the Redis snapshot;
            default a private redis-server (must not be older than the source server).
        max_lateness_s: a run starting later than this after its scheduled time still backs up, and says so.
    """
    _check_non_negative(max_lateness_s=max_lateness_s)
    logger = get_run_logger()
    settings = with_redis_user_sync(Settings.from_env(), "maintenance")
    paths = lake_paths(settings.parquet_dir)
    lateness, late = _lateness(logger, "backup", "backing up anyway (a missing backup is the bigger risk)",
                               max_lateness_s)
    backup_root = Path(backup_dir) if backup_dir else paths.backup
    source = None if settings.redis_url is None else sync_client(settings.redis_url, decode_responses=False)
    scratch: redis.Redis | None = None
    try:
        if source is None:
            logger.warning("backup: REDIS_URL is not set, so there is no Redis to snapshot; lake only")
        logger.info("backup of %s to %s (paths: %s)", paths.lake, backup_root, paths.source)
        report = make_backup(paths.lake, backup_root, day=utc_day(now_ms()), now_ms=now_ms(),
                             redis_client=source)
        if scratch_redis_db is not None and settings.redis_url is not None:
            scratch = sync_client(url_with_db(settings.redis_url, scratch_redis_db), decode_responses=False)
        check = check_backup(report.path, scratch=scratch)
    finally:
        for client in (source, scratch):
            if client is not None:
                client.close()
    summary = {"late": late, "lateness_s": round(lateness, 1), **report.summary(),
               "restore_check": check.summary()}
    rows = _backup_rows(report, check, late_note(lateness, max_lateness_s) if late else None)
    create_table_artifact(key="backup", table=rows,
                          description=f"{report.path.name}: {'created' if report.created else 'existed'}, "
                                      f"restore check {'ok' if check.ok else 'FAILED'}")
    logger.info("backup %s %s: %d files, %d bytes, %d decision records, redis keys %s; restore check %s",
                report.path, "created" if report.created else "existed already", report.files, report.bytes,
                report.decision_records, report.redis_keys, "ok" if check.ok else "FAILED")
    if not check.ok:
        raise MaintenanceFailedError(f"restore check of {report.path} failed: " + "; ".join(check.problems[:3]))
    return summary


def _backup_rows(report: BackupReport, check: RestoreCheck, late_note: str | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{"what": "late", "value": "", "detail": late_note}] if late_note else []
    rows += [
        {"what": "backup", "value": str(report.path),
         "detail": "created" if report.created else "today's backup existed; nothing changed"},
        {"what": "lake files", "value": report.lake_files, "detail": f"{report.vanished} vanished while copying"},
        {"what": "decision records", "value": report.decision_records, "detail": "decisions/"},
        {"what": "redis keys", "value": report.redis_keys if report.redis_keys is not None else "",
         "detail": "DUMP of every key" if report.redis_keys is not None else "REDIS_URL not set"},
        {"what": "restore check", "value": "ok" if check.ok else "FAILED",
         "detail": f"{check.files_checked} files, {check.parquet_rows} Parquet rows, {check.jsonl_rows} JSONL rows, "
                   f"{check.redis_keys_restored} Redis keys restored, {check.torn_tails} torn tails"},
    ]
    return rows + [{"what": "problem", "value": "", "detail": problem} for problem in check.problems]


def _check_non_negative(**values: int) -> None:
    bad = [f"{name}={value!r}" for name, value in values.items() if type(value) is not int or value < 0]
    if bad:
        raise ValueError(f"{', '.join(bad)}: allowed is an integer >= 0 (seconds)")


def _describe(summary: dict[str, Any], keys: tuple[str, ...]) -> str:
    return ", ".join(f"{key} {summary[key]}" for key in keys)
