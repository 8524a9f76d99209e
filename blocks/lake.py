"""`LakeSettings`: where the lake and its backups live, and how long hot data is kept."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field


class LakeSettings(Block):
    _block_type_name = "Lake Settings"
    _block_type_slug = "lake-settings"
    _description = "Root of the data lake, the backup target and the retention of hot partitions."

    parquet_dir: str = Field(default="var/lake", description="PARQUET_DIR: root of the lake")
    backup_dir: str = Field(default="var/backups", description="where the backup flow writes")
    retention_days: int = Field(default=30, ge=1, description="days kept hot before rotation")
