"""A Redis snapshot that can be restored anywhere: every key of one DB as its DUMP payload.

One JSON line per key: `{"key": b64, "type": "stream", "pttl": -1, "dump": b64}`. DUMP is
Redis's own serialization (with its RDB version and a CRC64), so RESTORE on any server of the
same or a newer version re-creates the key exactly, and a corrupted payload is refused. This
works for a remote server too, unlike copying the RDB file. Each key is consistent; the set of
keys is not one instant (keys are read in SCAN batches), which is fine for a daily backup of
streams that the lake records anyway.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import redis

from trading.bus import as_text

SCAN_BATCH = 500


class RedisDumpError(ValueError):
    """A snapshot line is malformed."""


@dataclass(frozen=True)
class DumpedKey:
    key: bytes
    type: str
    pttl: int  # -1: no expiry
    payload: bytes


def server_version(client: redis.Redis) -> str:
    return str(client.info("server")["redis_version"])


def dump_redis(client: redis.Redis, path: Path) -> int:
    """Write every key of the client's DB to `path` (fsynced); returns the number of keys.
    The client must not decode responses (payloads are bytes)."""
    count = 0
    with open(path, "wb") as out:
        keys: list[bytes] = []
        for key in client.scan_iter(count=SCAN_BATCH):
            keys.append(key)
            if len(keys) >= SCAN_BATCH:
                count += _dump_batch(client, keys, out)
                keys = []
        count += _dump_batch(client, keys, out)
        out.flush()
        os.fsync(out.fileno())
    return count


def _dump_batch(client: redis.Redis, keys: list[bytes], out: IO[bytes]) -> int:
    if not keys:
        return 0
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.type(key)
            pipe.pttl(key)
            pipe.dump(key)
        replies = pipe.execute()
    count = 0
    for index, key in enumerate(keys):
        kind, pttl, payload = replies[3 * index: 3 * index + 3]
        if payload is None:  # expired or deleted since SCAN returned it
            continue
        out.write(orjson.dumps({"key": base64.b64encode(key).decode(), "type": as_text(kind), "pttl": pttl,
                                "dump": base64.b64encode(payload).decode()}, option=orjson.OPT_APPEND_NEWLINE))
        count += 1
    return count



def read_dump(path: Path) -> Iterator[DumpedKey]:
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            try:
                record = orjson.loads(line)
                yield DumpedKey(base64.b64decode(record["key"], validate=True), str(record["type"]),
                                int(record["pttl"]), base64.b64decode(record["dump"], validate=True))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, binascii.Error) as exc:
                raise RedisDumpError(f"{path}:{number}: not a snapshot line ({exc})") from None


def restore_dump(client: redis.Redis, path: Path, *, replace: bool = False) -> Iterator[DumpedKey]:
    """RESTORE the snapshot's keys one by one, yielding each once it is restored (so a caller
    knows what exists when a later key fails). Remaining TTLs count from now. Without `replace`
    an existing key stops the restore (Redis answers BUSYKEY)."""
    for item in read_dump(path):
        client.restore(item.key, max(item.pttl, 0), item.payload, replace=replace)
        yield item


def url_with_db(url: str, db: int) -> str:
    """The same server with another DB number (`redis://host/3`, `unix:///sock?db=3`)."""
    if db < 0:
        raise ValueError(f"redis db {db}: allowed is a DB number >= 0")
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = [(k, v) for k, v in parse_qsl(parts.query) if k != "db"] + [("db", str(db))]
        return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))
