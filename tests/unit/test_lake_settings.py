"""The lake's paths have one source: the lake-settings block's fields, or its defaults beside the lake."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocks.lake import LakePaths, LakeSettings, LakeSettingsMismatchError


def test_without_a_block_backups_and_archive_sit_beside_the_lake() -> None:
    paths = LakePaths.resolve(Path("var/lake"), None)
    assert (paths.lake, paths.backup, paths.archive) == (Path("var/lake"), Path("var/lake-backup"),
                                                         Path("var/lake-archive"))
    assert paths.retention_days == 7 and "no lake-settings block" in paths.source


def test_the_blocks_defaults_are_the_same_paths() -> None:
    block = LakeSettings()
    paths = LakePaths.resolve(Path(block.parquet_dir), block)
    assert (paths.backup, paths.archive, paths.retention_days) == (Path("var/lake-backup"),
                                                                   Path("var/lake-archive"), 7)
    assert paths.source == "block lake-settings/default"


def test_a_saved_block_wins_over_the_defaults(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    block = LakeSettings(parquet_dir=str(lake), backup_dir=str(tmp_path / "b"), archive_dir=str(tmp_path / "a"),
                         retention_days=3)
    paths = LakePaths.resolve(lake, block)
    assert (paths.backup, paths.archive, paths.retention_days) == (tmp_path / "b", tmp_path / "a", 3)


def test_a_block_naming_another_lake_than_parquet_dir_is_refused(tmp_path: Path) -> None:
    block = LakeSettings(parquet_dir=str(tmp_path / "elsewhere"))
    with pytest.raises(LakeSettingsMismatchError, match="PARQUET_DIR"):
        LakePaths.resolve(tmp_path / "lake", block)
