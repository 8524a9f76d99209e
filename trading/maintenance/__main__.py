"""Restore a backup by hand (runbook in docs/maintenance.md):

    python -m trading.maintenance check BACKUP_DIR [--scratch-db N]   the restore check
    python -m trading.maintenance lake  BACKUP_DIR TARGET_DIR         lake files into TARGET_DIR
    python -m trading.maintenance redis BACKUP_DIR [--replace]        snapshot into REDIS_URL's DB

Redis is always the server of REDIS_URL (a URL can hold a password, so it is never an
argument). Prints a JSON summary; exits 1 when the check finds a problem or a restore fails.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson
import redis

from trading.config import Settings
from trading.maintenance.backup import BackupError
from trading.maintenance.redis_snapshot import url_with_db
from trading.maintenance.restore import check_backup, restore_lake, restore_snapshot
from trading.redis_conn import sync_client


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trading.maintenance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="read a backup back and compare it with its manifest")
    check.add_argument("backup", type=Path)
    check.add_argument("--scratch-db", type=int, default=None,
                       help="an empty DB of REDIS_URL's server to restore into (default: a private redis-server)")
    lake = commands.add_parser("lake", help="copy the backup's lake files into a directory")
    lake.add_argument("backup", type=Path)
    lake.add_argument("target", type=Path)
    snapshot = commands.add_parser("redis", help="RESTORE the backup's Redis snapshot into REDIS_URL's DB")
    snapshot.add_argument("backup", type=Path)
    snapshot.add_argument("--replace", action="store_true", help="overwrite keys that exist")
    return parser


def _redis_url() -> str:
    url = Settings.from_env().redis_url
    if url is None:
        raise BackupError("set REDIS_URL to the Redis server to use")
    return url


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            scratch = None if args.scratch_db is None else sync_client(url_with_db(_redis_url(), args.scratch_db),
                                                                       decode_responses=False)
            try:
                result = check_backup(args.backup, scratch=scratch)
            finally:
                if scratch is not None:
                    scratch.close()
            print(orjson.dumps(result.summary(), option=orjson.OPT_INDENT_2).decode())
            return 0 if result.ok else 1
        if args.command == "lake":
            print(orjson.dumps({"files_restored": restore_lake(args.backup, args.target)}).decode())
            return 0
        client = sync_client(_redis_url(), decode_responses=False)
        try:
            print(orjson.dumps({"keys_restored": restore_snapshot(args.backup, client, replace=args.replace)}).decode())
        finally:
            client.close()
        return 0
    except (BackupError, OSError, ValueError, redis.RedisError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
