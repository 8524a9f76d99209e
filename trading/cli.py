"""`trading` console script: local operations that need no Prefect."""

from __future__ import annotations

import argparse
import json
import sys

from trading.config import ConfigError, Settings


def _check_config(_: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps(settings.describe(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trading", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check-config", help="validate the environment and print the settings (secrets masked)"
                        ).set_defaults(handler=_check_config)
    args = parser.parse_args(argv)
    handler = args.handler
    return int(handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
