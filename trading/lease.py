"""A Redis lease: exactly one instance of a loop runs, whatever the scheduler believes (design §4).

`lease:<name>` holds the holder's random token plus who it is (host, pid, start time), set
with NX and a TTL; `lease:<name>:fencing` is INCRed on every acquisition and the value is
handed to the holder as its fencing token, so a side effect can be refused from a holder
that lost the lease without knowing it. Renew and release act only when the token matches
(Lua, atomic). The holder learns it lost the lease from `renew()` returning False, or from
`keep_renewed()` raising `LeaseLostError`: run it beside the work in a TaskGroup, so losing
the lease stops the work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

import orjson
import redis.asyncio

from trading.clock import now_ms

log = logging.getLogger(__name__)

LEASE_KEY_PREFIX = "lease:"

# Returns the fencing token on success, or {current value, its PTTL} when someone holds it.
_ACQUIRE_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""
# 1: extended. 2: the key had vanished (Redis restarted without persistence, or it expired
# with nobody taking it) and is ours again. 0: someone else holds it.
_RENEW_LUA = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not current and redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 2
end
return 0
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


@dataclass(frozen=True)
class Lease:
    name: str
    fencing_token: int
    holder: LeaseHolder


class LeaseHeldError(RuntimeError):
    def __init__(self, name: str, holder: LeaseHolder | None, ttl_ms: int) -> None:
        who = holder.describe() if holder else "an unknown holder"
        super().__init__(f"lease {name!r} is held by {who}; it expires in {ttl_ms} ms unless renewed")
        self.name = name
        self.holder = holder
        self.ttl_ms = ttl_ms


class LeaseLostError(RuntimeError):
    """The holder could not renew its lease in time: another instance may now hold it."""


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
        self._fencing_key = self._key + ":fencing"
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._client = client
        self._value: str | None = None  # what we stored: token + holder info, compared on renew/release
        self.lease: Lease | None = None

    async def try_acquire(self) -> Lease | None:
        """The lease if it was free, else None."""
        return await self._attempt(raise_held=False)

    async def acquire(self, *, wait_s: float = 0.0, poll_s: float = 0.25) -> Lease:
        """The lease, waiting up to `wait_s` for the holder to let go; else `LeaseHeldError` naming it."""
        deadline = time.monotonic() + wait_s
        while True:
            if time.monotonic() >= deadline:
                lease = await self._attempt(raise_held=True)
            else:
                lease = await self._attempt(raise_held=False)
            if lease is not None:
                return lease
            await asyncio.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))

    async def _attempt(self, *, raise_held: bool) -> Lease | None:
        if self.lease is not None:
            raise RuntimeError(f"lease {self.name!r} is already held by this instance")
        holder = LeaseHolder(host=socket.gethostname(), pid=os.getpid(), started_ms=now_ms())
        value = orjson.dumps({"token": secrets.token_hex(16), "host": holder.host, "pid": holder.pid,
                              "started_ms": holder.started_ms}).decode()
        # Kept before the call: cancelled after Redis ran the script, `release()` can still delete the key.
        self._value = value
        result = await self._acquire(keys=[self._key, self._fencing_key], args=[value, self.ttl_ms])
        if isinstance(result, list):
            self._value = None
            if raise_held:
                current, ttl_ms = result
                raise LeaseHeldError(self.name, _holder_from_value(current) if current else None, int(ttl_ms))
            return None
        self.lease = Lease(name=self.name, fencing_token=int(result), holder=holder)
        return self.lease

    async def holder(self) -> LeaseHolder | None:
        """Who holds the lease now, if anyone."""
        value = await self._client.get(self._key)
        return _holder_from_value(value) if value is not None else None

    async def renew(self) -> bool:
        """Extend the TTL; False when someone else holds the lease (or we released it).

        A lease key that vanished while nobody else took it (a Redis restart without persistence)
        is taken back: no other holder exists at that moment, so the loop may go on.
        """
        if self._value is None:
            return False
        outcome = int(await self._renew(keys=[self._key], args=[self._value, self.ttl_ms]))
        if outcome == 0:
            self._forget()
        elif outcome == 2:
            log.warning("lease %r had vanished (Redis restarted or lost data?) and was taken back", self.name)
        return outcome != 0

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

    async def keep_renewed(self, *, every_s: float | None = None) -> NoReturn:
        """Renew every `every_s` (default a third of the TTL) until cancelled.

        Raises `LeaseLostError` when a renewal says the lease is gone, or when Redis errors
        kept it from being renewed for a whole TTL (it may have expired and been taken).
        """
        interval = every_s if every_s is not None else self.ttl_ms / 3000
        expires_at = time.monotonic() + self.ttl_ms / 1000
        while True:
            await asyncio.sleep(interval)
            attempt_at = time.monotonic()
            try:
                # Client retries must not carry a renewal past the moment the lease may expire.
                async with asyncio.timeout(max(0.0, expires_at - attempt_at)):
                    still_ours = await self.renew()
            except (redis.RedisError, OSError, TimeoutError) as exc:
                if time.monotonic() >= expires_at:
                    self._forget()
                    raise LeaseLostError(f"lease {self.name!r}: not renewed for {self.ttl_ms} ms "
                                         f"({type(exc).__name__}: {exc})") from exc
                continue
            if not still_ours:
                raise LeaseLostError(f"lease {self.name!r} was lost: it expired or another holder took it")
            expires_at = attempt_at + self.ttl_ms / 1000
