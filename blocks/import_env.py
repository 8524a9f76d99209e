"""Import `.env.bitvavo` into the `BitvavoCredentials` block: `python -m blocks.import_env [FILE] [--name N]`.

The file holds `KEY=VALUE` lines with the block's field names (`api_key`, `api_secret`,
`operator_id`, `rest_url`, `ws_url`) or the matching `BITVAVO_*` variables. Nothing secret is
printed: the command reports which fields it set. Re-running overwrites the block.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blocks.credentials import DEFAULT_BLOCK_NAME, BitvavoCredentials

FIELDS = ("api_key", "api_secret", "operator_id", "rest_url", "ws_url")


class EnvFileError(ValueError):
    pass


def parse_env_file(text: str) -> dict[str, str]:
    """Field name -> value; `BITVAVO_API_KEY` and `api_key` both map to `api_key`."""
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.removeprefix("export ").partition("=")
        if not sep:
            raise EnvFileError(f"line {number}: expected KEY=VALUE")
        name = key.strip().lower().removeprefix("bitvavo_")
        if name not in FIELDS:
            raise EnvFileError(f"line {number}: unknown field {key.strip()!r}; allowed: {', '.join(FIELDS)}")
        values[name] = value.strip().strip("'\"")
    missing = [name for name in ("api_key", "api_secret") if not values.get(name)]
    if missing:
        raise EnvFileError(f"missing {', '.join(missing)}")
    if len(values["api_key"]) != 64:
        raise EnvFileError("api_key must be 64 characters (Bitvavo API keys are)")
    if values.get("operator_id") and not values["operator_id"].isdigit():
        raise EnvFileError("operator_id must be a positive integer")
    return values


def credentials_from(values: dict[str, str]) -> BitvavoCredentials:
    kwargs: dict[str, object] = {k: v for k, v in values.items() if k not in ("operator_id",)}
    if values.get("operator_id"):
        kwargs["operator_id"] = int(values["operator_id"])
    return BitvavoCredentials(**kwargs)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", default=".env.bitvavo", type=Path)
    parser.add_argument("--name", default=DEFAULT_BLOCK_NAME, help="block document name (default: default)")
    args = parser.parse_args(argv)
    try:
        values = parse_env_file(args.file.read_text())
    except OSError as exc:
        print(f"cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    except EnvFileError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 2
    credentials_from(values).save(args.name, overwrite=True)
    print(f"saved bitvavo-credentials/{args.name} with fields: {', '.join(sorted(values))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
