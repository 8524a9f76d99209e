"""A Redis lease: exactly one instance of a loop runs, whatever the scheduler believes (design §4).

`lease:<name>` holds the holder's random token plus who it is (host, pid, start time), set
with NX and a TTL; `lease:<name>:fencing` is INCRed on every acquisition and the value is
handed to the holder as its fencing token, so a side effect of a holder that lost the lease
without knowing it can be refused: a script compares the counter with the token the holder has
now (`Lease.current()`, newer after a re-acquisition) before acting, as the live send claim does
(trading/execution/live.py). Renew and release act only when the token matches (Lua, atomic).

`keep_renewed()` runs beside the work (`trading/loop.py`) on the lease's own connections
(`redis_conn.dedicated_client`: a stuck command of the loop cannot delay it), renewing every
`ttl/15` (1 s of the default 15 s), each attempt bounded by `ttl/5`. It keeps the loop's
`CommandGate` open only while the lease is known held: until `ttl/3` after the start of the
last renewal that succeeded. So the loop stops reading and writing Redis at the first failed
renewal, at the latest `ttl/3` after the last good one (also when the event loop was too busy
to renew), and a command that passed the gate just before ends within the client's socket
timeout (5 s): all of it before the lease can expire (`ttl`).

Redis away (errors, timeouts) or the key gone (it expired, or Redis lost it) pauses the loop;
the lease is then re-acquired, with a NEW fencing token, as soon as Redis answers again, and
the loop goes on. Re-acquiring succeeds only if no other instance acquired the lease since this
one did: the key is this holder's or absent, and the fencing counter is still this holder's
token (a counter lost with Redis's data continues from it, so tokens never go back). Finding
another holder, or a counter that moved, raises `LeaseLostError`: the other instance acted, so
this one stops. Redis unreachable for `REDIS_AWAY_LIMIT_S` (5 min) raises it too: past that the
loop's state (books, open orders) is too old to pick up again, and a Failed run in Prefect says
more to an operator than a loop silently waiting; its restart starts from Redis's state. A loop
starting while Redis is away waits for it the same way (`acquire()` retries with the same value,
so a call that ran but lost its reply still counts as this holder's).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any, NoReturn

import orjson
import redis.asyncio

from trading.clock import now_ms
from trading.redis_conn import CommandGate

log = logging.getLogger(__name__)

LEASE_KEY_PREFIX = "lease:"
REDIS_AWAY_LIMIT_S = 300.0  # a loop paused this long without re-acquiring its lease stops (LeaseLostError)
_REDIS_DOWN = (redis.RedisError, OSError)  # TimeoutError is an OSError

# Returns the fencing token on success, or {current value, its PTTL} when someone holds it.
# A retry whose first call ran but lost its reply finds its own value: the counter is still its token.
_ACQUIRE_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then return tonumber(redis.call('GET', KEYS[2])) end
return {current, redis.call('PTTL', KEYS[1])}
"""
# 1: extended. 2: the key is gone (it expired, or Redis lost it): re-acquire. 0: someone else holds it.
_RENEW_LUA = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not current then return 2 end
return 0
"""
# ARGV: our value, the new value, TTL, our fencing token. The new fencing token; or {'held', value, PTTL}
# when another holder has the key; or {'fenced', counter} when another instance acquired it since we did.
_REACQUIRE_LUA = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then
  return {'held', current, redis.call('PTTL', KEYS[1])}
end
local ours = tonumber(ARGV[4])
local counter = tonumber(redis.call('GET', KEYS[2]) or '0')
if counter > ours then return {'fenced', tostring(counter)} end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ours + 1)
return ours + 1
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class LeaseHolder:
    host: str
    pid: int
    started_ms: int

    def describe(self) -> str:
        started = datetime.fromtimestamp(self.started_ms / 1000, UTC).isoformat(timespec="seconds")
        return f"host={self.host} pid={self.pid} since {started}"


def fencing_key(name: str) -> str:
    """The counter of lease `name`'s acquisitions: its value is the fencing token of the latest one."""
    return f"{LEASE_KEY_PREFIX}{name}:fencing"


@dataclass(frozen=True)
class Lease:
    name: str
    fencing_token: int
    holder: LeaseHolder
    keeper: RedisLease | None = field(default=None, compare=False, repr=False)  # the RedisLease that acquired it

    @property
    def fencing_key(self) -> str:
        return fencing_key(self.name)

    def current(self) -> Lease:
        """This instance's latest acquisition of the lease: itself, or a newer one with a new fencing token when
        the keeper re-acquired the lease after Redis was away."""
        latest = self.keeper.latest if self.keeper is not None else None
        return latest if latest is not None else self


class LeaseHeldError(RuntimeError):
    def __init__(self, name: str, holder: LeaseHolder | None, ttl_ms: int) -> None:
        who = holder.describe() if holder else "an unknown holder"
        super().__init__(f"lease {name!r} is held by {who}; it expires in {ttl_ms} ms unless renewed")
        self.name = name
        self.holder = holder
        self.ttl_ms = ttl_ms


class LeaseLostError(RuntimeError):
    """Another instance holds (or held) the lease, or Redis stayed away too long to take it back."""


class Renewal(Enum):
    EXTENDED = 1
    GONE = 2  # the key expired or Redis lost it: nobody holds it now, maybe someone did meanwhile
    TAKEN = 0  # another holder has it


def _holder_from_value(value: Any) -> LeaseHolder | None:
    try:
        data = orjson.loads(value)
        return LeaseHolder(host=str(data["host"]), pid=int(data["pid"]), started_ms=int(data["started_ms"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class RedisLease:
    """One named lease; an instance holds at most one acquisition at a time."""

    def __init__(self, client: redis.asyncio.Redis, name: str, *, ttl_ms: int = 15_000) -> None:
        if ttl_ms < 100:
            raise ValueError("ttl_ms must be at least 100")
        self.name = name
        self.ttl_ms = ttl_ms
        self._key = LEASE_KEY_PREFIX + name
        self._fencing_key = fencing_key(name)
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._reacquire = client.register_script(_REACQUIRE_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._client = client
        self._value: str | None = None  # what we stored: token + holder info, compared on renew/release
        self._pending: tuple[str, LeaseHolder] | None = None  # the value of the last acquisition attempt
        self.lease: Lease | None = None
        self.latest: Lease | None = None  # the last acquisition, kept after release (its fencing token)
        self.confirmed_at = 0.0  # time.monotonic() at the start of the last call that found the lease ours
        self.pauses: list[float] = []  # seconds each pause lasted, from the failed renewal to the re-acquisition

    @property
    def held_for_s(self) -> float:
        """How long after a confirmation the lease counts as held without another (see the module docstring)."""
        return self.ttl_ms / 3000

    async def try_acquire(self) -> Lease | None:
        """The lease if it was free, else None."""
        return await self._attempt(raise_held=False)

    async def acquire(self, *, wait_s: float = 0.0, poll_s: float = 0.25,
                      give_up_s: float = REDIS_AWAY_LIMIT_S) -> Lease:
        """The lease, waiting up to `wait_s` for the holder to let go; else `LeaseHeldError` naming it.
        Redis errors are retried (same value, so a call that ran but lost its reply counts) for `give_up_s`."""
        deadline = time.monotonic() + wait_s
        pending: tuple[str, LeaseHolder] | None = None
        away_since: float | None = None
        while True:
            try:
                lease = await self._attempt(raise_held=time.monotonic() >= deadline, pending=pending)
            except _REDIS_DOWN as exc:
                pending = self._pending
                away_since = away_since if away_since is not None else time.monotonic()
                if time.monotonic() - away_since >= give_up_s:
                    raise
                log.warning("lease %r: Redis unavailable while acquiring (%s: %s); retrying", self.name,
                            type(exc).__name__, exc)
                await asyncio.sleep(poll_s)
                continue
            away_since = None
            if lease is not None:
                return lease
            pending = None
            await asyncio.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))

    def _new_value(self) -> tuple[str, LeaseHolder]:
        holder = LeaseHolder(host=socket.gethostname(), pid=os.getpid(), started_ms=now_ms())
        value = orjson.dumps({"token": secrets.token_hex(16), "host": holder.host, "pid": holder.pid,
                              "started_ms": holder.started_ms}).decode()
        return value, holder

    async def _attempt(self, *, raise_held: bool, pending: tuple[str, LeaseHolder] | None = None) -> Lease | None:
        if self.lease is not None:
            raise RuntimeError(f"lease {self.name!r} is already held by this instance")
        value, holder = self._pending = pending or self._new_value()
        # Kept before the call: cancelled after Redis ran the script, `release()` can still delete the key.
        self._value = value
        attempt_at = time.monotonic()
        result = await self._acquire(keys=[self._key, self._fencing_key], args=[value, self.ttl_ms])
        if isinstance(result, list):
            self._value = None
            if raise_held:
                current, ttl_ms = result
                raise LeaseHeldError(self.name, _holder_from_value(current) if current else None, int(ttl_ms))
            return None
        self.confirmed_at = attempt_at
        self.lease = self.latest = Lease(name=self.name, fencing_token=int(result), holder=holder, keeper=self)
        return self.lease

    async def holder(self) -> LeaseHolder | None:
        """Who holds the lease now, if anyone."""
        value = await self._client.get(self._key)
        return _holder_from_value(value) if value is not None else None

    async def renew(self) -> Renewal:
        """Extend the TTL if the key still holds our token. `TAKEN` forgets the lease (another holder has it);
        after `GONE` only `reacquire()` can tell whether anyone held it meanwhile."""
        if self._value is None:
            return Renewal.TAKEN
        attempt_at = time.monotonic()
        outcome = Renewal(int(await self._renew(keys=[self._key], args=[self._value, self.ttl_ms])))
        if outcome is Renewal.EXTENDED:
            self.confirmed_at = attempt_at
        elif outcome is Renewal.TAKEN:
            self._forget()
        return outcome

    async def reacquire(self) -> Lease:
        """Hold the lease again under a new fencing token, if nobody else acquired it since we did;
        else forget it and raise `LeaseLostError`."""
        if self._value is None or self.latest is None:
            raise LeaseLostError(f"lease {self.name!r} is not held by this instance")
        value, holder = self._new_value()
        attempt_at = time.monotonic()
        result = await self._reacquire(keys=[self._key, self._fencing_key],
                                       args=[self._value, value, self.ttl_ms, self.latest.fencing_token])
        if isinstance(result, list):
            self._forget()
            if str(result[0]) == "held":
                other = _holder_from_value(result[1])
                who = other.describe() if other else "an unknown holder"
                raise LeaseLostError(f"lease {self.name!r} is held by {who}: another instance took it")
            raise LeaseLostError(f"lease {self.name!r} was acquired by another instance meanwhile (fencing token "
                                 f"{result[1]} > ours, {self.latest.fencing_token})")
        self._value = value
        self.confirmed_at = attempt_at
        self.lease = self.latest = Lease(name=self.name, fencing_token=int(result), holder=holder, keeper=self)
        return self.lease

    async def release(self) -> bool:
        """Delete the lease if it is still ours; False when it was not."""
        if self._value is None:
            return False
        try:
            return bool(await self._release(keys=[self._key], args=[self._value]))
        finally:
            self._forget()

    def _forget(self) -> None:
        self._value = None
        self.lease = None

    async def keep_renewed(self, *, gate: CommandGate | None = None, every_s: float | None = None,
                           give_up_s: float = REDIS_AWAY_LIMIT_S) -> NoReturn:
        """Renew every `every_s` (default `ttl/15`) until cancelled, keeping `gate` open while the lease is held.

        A renewal that fails (Redis error, no answer within `ttl/5`) or finds the key gone shuts the gate
        and re-acquires the lease as soon as Redis answers (`reacquire()`, a new fencing token), then
        opens the gate again. Raises `LeaseLostError` when another holder has or had the lease, or when
        it could not be re-acquired for `give_up_s`.
        """
        interval = every_s if every_s is not None else self.ttl_ms / 15_000
        attempt_s = self.ttl_ms / 5000
        self._open(gate)
        while True:
            await asyncio.sleep(interval)
            try:
                async with asyncio.timeout(attempt_s):
                    outcome = await self.renew()
                failure = "the lease key is gone (expired, or Redis lost it)"
            except _REDIS_DOWN as exc:
                outcome, failure = None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if outcome is Renewal.EXTENDED:
                self._open(gate)
                continue
            if outcome is Renewal.TAKEN:
                raise LeaseLostError(f"lease {self.name!r} was lost: it expired and another holder took it")
            await self._pause_and_reacquire(gate, failure, interval=interval, attempt_s=attempt_s,
                                            give_up_s=give_up_s)

    async def _pause_and_reacquire(self, gate: CommandGate | None, failure: str, *, interval: float,
                                   attempt_s: float, give_up_s: float) -> None:
        if gate is not None:
            gate.close()
        paused_at = time.monotonic()
        before = self.latest.fencing_token if self.latest else 0
        log.warning("lease %r not renewed (%s): the loop pauses until it is re-acquired", self.name, failure)
        while True:
            try:
                async with asyncio.timeout(attempt_s):
                    held = await self.reacquire()
                break
            except _REDIS_DOWN as exc:
                if time.monotonic() - paused_at >= give_up_s:
                    self._forget()
                    raise LeaseLostError(f"lease {self.name!r}: not re-acquired within {give_up_s:.0f} s "
                                         f"({type(exc).__name__}: {exc})") from exc
            await asyncio.sleep(interval)
        paused_s = time.monotonic() - paused_at
        self.pauses.append(paused_s)
        log.warning("lease %r re-acquired after a %.1f s pause (fencing token %d -> %d); the loop goes on",
                    self.name, paused_s, before, held.fencing_token)
        self._open(gate)

    def _open(self, gate: CommandGate | None) -> None:
        if gate is not None:
            gate.open_until(self.confirmed_at + self.held_for_s)
