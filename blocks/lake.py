"""`LakeSettings`: where the lake's backups and archive live, and how many days rotation keeps.

The one source of truth for the lake's paths: compaction, rotation, backup and preflight's
backup check all resolve them with `lake_paths`/`alake_paths`, from the `lake-settings/default`
block when it is saved, otherwise from the defaults here (beside the lake: `var/lake-backup` and
`var/lake-archive` for the default `var/lake`). Relative paths are relative to the checkout,
where every flow runs (the deployments' pull step). The lake root itself is `PARQUET_DIR`,
because the loops write there; a block naming another `parquet_dir` stops the maintenance
flows rather than back up or rotate a directory nobody writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

from prefect.blocks.core import Block
from prefect.exceptions import ObjectNotFound
from pydantic import Field

DEFAULT_BLOCK_NAME = "default"
BACKUP_DIR_NAME = "lake-backup"
ARCHIVE_DIR_NAME = "lake-archive"
DEFAULT_RETENTION_DAYS = 7


class LakeSettings(Block):
    _block_type_name = "Lake Settings"
    _block_type_slug = "lake-settings"
    _description = "Root of the data lake, where backups and archived days go, and the retention of hot partitions."

    parquet_dir: str = Field(default="var/lake",
                             description="root of the lake; must be PARQUET_DIR, where the loops write")
    backup_dir: str | None = Field(
        default=None, description=f"where the backup flow writes, one directory per UTC day; empty: beside the "
                                  f"lake, <parquet_dir>/../{BACKUP_DIR_NAME} (var/{BACKUP_DIR_NAME})")
    archive_dir: str | None = Field(
        default=None, description=f"where lake-rotation moves old days in archive mode; empty: beside the lake, "
                                  f"<parquet_dir>/../{ARCHIVE_DIR_NAME} (var/{ARCHIVE_DIR_NAME})")
    retention_days: int = Field(default=DEFAULT_RETENTION_DAYS, ge=1,
                                description="days before today that lake-rotation keeps in the lake")


class LakeSettingsMismatchError(ValueError):
    """The block's `parquet_dir` is not `PARQUET_DIR`: one of the two is wrong, and which is for a human."""


@dataclass(frozen=True)
class LakePaths:
    lake: Path
    backup: Path
    archive: Path
    retention_days: int
    source: str  # where the paths came from, for logs and artifacts

    @classmethod
    def resolve(cls, parquet_dir: Path, block: LakeSettings | None, block_name: str = DEFAULT_BLOCK_NAME) -> LakePaths:
        """The paths for the lake at `parquet_dir` (PARQUET_DIR), with the saved block over the defaults."""
        settings = block or LakeSettings()
        if block is not None and Path(block.parquet_dir).resolve() != parquet_dir.resolve():
            raise LakeSettingsMismatchError(
                f"block lake-settings/{block_name} has parquet_dir {block.parquet_dir!r} but PARQUET_DIR is "
                f"{str(parquet_dir)!r} (where the loops write): make them name the same directory")
        beside = parquet_dir.parent
        return cls(lake=parquet_dir,
                   backup=Path(settings.backup_dir) if settings.backup_dir else beside / BACKUP_DIR_NAME,
                   archive=Path(settings.archive_dir) if settings.archive_dir else beside / ARCHIVE_DIR_NAME,
                   retention_days=settings.retention_days,
                   source=f"block lake-settings/{block_name}" if block else "defaults (no lake-settings block saved)")


def lake_paths(parquet_dir: Path, block_name: str = DEFAULT_BLOCK_NAME) -> LakePaths:
    """`LakePaths.resolve` with the saved block, read synchronously (for the sync maintenance flows)."""
    try:
        block: LakeSettings | None = cast(LakeSettings, LakeSettings.load(block_name))
    except ValueError as exc:
        _raise_unless_missing(exc)
        block = None
    return LakePaths.resolve(parquet_dir, block, block_name)


async def alake_paths(parquet_dir: Path, block_name: str = DEFAULT_BLOCK_NAME) -> LakePaths:
    try:
        block: LakeSettings | None = cast(LakeSettings, await LakeSettings.aload(block_name))
    except ValueError as exc:
        _raise_unless_missing(exc)
        block = None
    return LakePaths.resolve(parquet_dir, block, block_name)


def _raise_unless_missing(exc: ValueError) -> None:
    """A block that was never saved means the defaults; any other load error is raised."""
    if not isinstance(exc.__cause__, ObjectNotFound):  # prefect raises ValueError from ObjectNotFound
        raise exc
