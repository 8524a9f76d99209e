"""Reading a stream as a consumer group (design §4), the way every trading loop does it.

- One group per role (`signal-engine`, `trading-core`, `executor`, `pnl`), created on first
  use. Only one instance of a role is active (the loop's Redis lease), so at start every entry
  still pending in the group belongs to a dead instance: it is claimed (XAUTOCLAIM) and
  processed first, in stream order, before new entries.
- An entry is acknowledged in the SAME Redis transaction (MULTI/EXEC) as the writes that are
  its side effect: the handler queues its writes on the transaction it is given, and XACK is
  appended. A crash before EXEC leaves the entry pending with no effect; after EXEC both the
  effect and the ack exist. An idempotency mark on the entry's natural key (signal_id,
  intent_id, ...) goes in the same transaction, so a duplicate entry is skipped.
- `RejectEntry` (bad input: missing field, not a decimal, unknown market) sends the entry to
  `<stream>:dead` at once with the reason. Any other exception is retried in place (order
  matters: PnL is FIFO) with a capped backoff, and after `max_attempts` deliveries, counted
  across restarts through the group's delivery counter, the entry goes to `:dead` too.
- Redis being down is not the entry's fault: the loop backs off and reads again, without
  counting an attempt against the entry. Neither is an orderly stop (a cancel): the entries
  delivered to the stopping run and not acknowledged get their delivery count back, so only
  runs that died on an entry count against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from trading.backoff import Backoff
from trading.bus import as_text, dead_letter_stream, encode_entry
from trading.clock import now_ms
from trading.events import Severity, queue_event
from trading.lake import LakeWriteError
from trading.log_sampling import worth_logging
from trading.metrics import LabelCache

log = logging.getLogger(__name__)

UNDELIVER_TIMEOUT_S = 1.0  # inside the loops' 3 s cleanup bound (trading/loop.py)
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
DONE_TTL_S = 7 * 24 * 3600  # idempotency marks outlive any stream's retention


class RejectEntry(ValueError):
    """The entry itself is wrong; retrying cannot help. The message is the dead-letter reason."""


@dataclass(frozen=True)
class StreamEntry:
    stream: str
    entry_id: str
    fields: dict[str, str]
    deliveries: int  # 1 on first delivery; more when an earlier instance died holding it


class ConsumerMetrics:
    """`<prefix>_consumed_total`, `_dead_letters_total`, `_handler_errors_total`, `_pending`, `_consumer_lag`."""

    def __init__(self, prefix: str, registry: CollectorRegistry) -> None:
        self.consumed = LabelCache(Counter(f"{prefix}_consumed", "Stream entries processed and acknowledged",
                                           ["stream"], registry=registry))
        self.dead_letters = LabelCache(Counter(f"{prefix}_dead_letters", "Entries moved to <stream>:dead",
                                               ["stream", "cause"], registry=registry))
        self.handler_errors = LabelCache(Counter(f"{prefix}_handler_errors",
                                                 "Failed attempts to process an entry (retried)", ["stream"],
                                                 registry=registry))
        self.pending = LabelCache(Gauge(f"{prefix}_pending", "Entries delivered to the group and not acknowledged",
                                        ["stream"], registry=registry))
        self.lag = LabelCache(Gauge(f"{prefix}_consumer_lag", "Entries in the stream not yet delivered to the group",
                                    ["stream"], registry=registry))
        self.redis_errors = Counter(f"{prefix}_redis_errors", "Redis failures while consuming (backed off)",
                                    registry=registry)


Handler = Callable[[StreamEntry, Pipeline], Awaitable[None]]


@dataclass
class ConsumerStats:
    consumed: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    reclaimed: int = 0
    handler_errors: int = 0
    redis_errors: int = 0
    last_error: str = ""
    dead_reasons: dict[str, int] = field(default_factory=dict)


class GroupConsumer:
    """One stream, one group, this process as the group's consumer."""

    def __init__(self, client: redis.asyncio.Redis, stream: str, group: str, *, metrics: ConsumerMetrics,
                 start_id: str = "$", batch_size: int = 100, block_ms: int = 500, max_attempts: int = 5,
                 retry_backoff: Backoff | None = None, dead_maxlen: int = 100_000,
                 on_commit: Callable[[StreamEntry], None] | None = None) -> None:
        self.client: Any = client  # redis-py's async stubs type replies as sync|async unions
        self.stream = stream
        self.group = group
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self._metrics = metrics
        self._start_id = start_id  # where a NEW group starts: "$" new entries only, "0" the whole stream
        self._batch_size = batch_size
        self._block_ms = block_ms
        self._max_attempts = max_attempts
        self._retry_backoff = retry_backoff or Backoff(base_s=0.05, cap_s=2.0)
        self._redis_backoff = Backoff(base_s=0.1, cap_s=5.0)
        self._dead_stream = dead_letter_stream(stream)
        self._dead_maxlen = dead_maxlen
        self._done_prefix = f"done:{group}:"
        self._on_commit = on_commit  # after an entry's transaction committed (e.g. lake copies, counters)
        self.stats = ConsumerStats()

    # -- group set-up and recovery ------------------------------------------------------------

    async def ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.stream, self.group, id=self._start_id, mkstream=True)
            log.info("consumer group %s created on %s at %s", self.group, self.stream, self._start_id)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def claim_abandoned(self) -> list[StreamEntry]:
        """Every entry pending in the group, now owned by this consumer, oldest first.

        The lease makes this the only active instance, so nothing pending is anyone else's
        live work. Other consumers' names are removed once they hold nothing.
        """
        claimed: list[StreamEntry] = []
        cursor = "0-0"
        while True:
            reply = await self.client.xautoclaim(self.stream, self.group, self.consumer, min_idle_time=0,
                                                 start_id=cursor, count=500)
            cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            for entry_id, fields in reply[1]:
                claimed.append(await self._entry(entry_id, fields, deliveries=None))
            if cursor in ("0-0", "0"):
                break
        claimed.sort(key=lambda e: _id_key(e.entry_id))
        for info in await self.client.xinfo_consumers(self.stream, self.group):
            name = as_text(info["name"])
            if name != self.consumer and int(info["pending"]) == 0:
                await self.client.xgroup_delconsumer(self.stream, self.group, name)
        self.stats.reclaimed += len(claimed)
        if claimed:
            log.warning("%s: reclaimed %d entries left pending on %s by a previous instance", self.group,
                        len(claimed), self.stream)
        return claimed

    async def _entry(self, entry_id: Any, fields: Any, *, deliveries: int | None) -> StreamEntry:
        entry_id = as_text(entry_id)
        decoded = {as_text(k): as_text(v) for k, v in (fields or {}).items()}
        if deliveries is None:
            detail = await self.client.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
            deliveries = int(detail[0]["times_delivered"]) if detail else 1
        return StreamEntry(self.stream, entry_id, decoded, deliveries)

    # -- the loop -----------------------------------------------------------------------------

    async def run(self, handle: Handler) -> None:
        """Process entries until cancelled: the abandoned ones first, then new ones as they come."""
        backlog: list[StreamEntry] = []
        try:
            await self._run(handle, backlog)
        except asyncio.CancelledError:
            await self._undeliver(backlog)
            raise

    async def _undeliver(self, undone: list[StreamEntry]) -> None:
        """An orderly stop is no failed delivery: the entries this run was handed and did not ack get their
        delivery count back (XCLAIM RETRYCOUNT), so a loop stopped and started often never dead-letters
        good entries as "not processed after N deliveries". Best effort, bounded: with Redis away the
        counts stay one higher, as after a crash."""
        by_count: dict[int, list[str]] = {}
        for entry in undone:
            by_count.setdefault(max(0, entry.deliveries - 1), []).append(entry.entry_id)
        with contextlib.suppress(*_REDIS_DOWN, TimeoutError):
            async with asyncio.timeout(UNDELIVER_TIMEOUT_S):
                for count, ids in by_count.items():
                    await self.client.xclaim(self.stream, self.group, self.consumer, 0, ids, retrycount=count,
                                             justid=True)

    async def _run(self, handle: Handler, backlog: list[StreamEntry]) -> None:
        started = False
        while True:
            try:
                if not started:
                    await self.ensure_group()
                    backlog.extend(await self.claim_abandoned())
                    started = True
                if not backlog:
                    backlog.extend(await self.read_new())
                while backlog:
                    await self.process(backlog[0], handle)
                    backlog.pop(0)
                self._redis_backoff.reset()
            except LakeWriteError:
                raise  # a lake failure is an OSError too, but no backoff heals a full disk: stop loudly
            except _REDIS_DOWN as exc:
                self.stats.redis_errors += 1
                self._metrics.redis_errors.inc()
                delay = self._redis_backoff.next_delay()
                if worth_logging(self.stats.redis_errors):
                    log.warning("%s: redis unavailable (%s: %s); retrying in %.2fs", self.group,
                                type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)

    async def read_new(self) -> list[StreamEntry]:
        reply = await self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                             count=self._batch_size, block=self._block_ms)
        entries: list[StreamEntry] = []
        for _stream, items in reply or ():
            for entry_id, fields in items:
                entries.append(StreamEntry(self.stream, as_text(entry_id),
                                           {as_text(k): as_text(v) for k, v in (fields or {}).items()}, 1))
        return entries

    async def process(self, entry: StreamEntry, handle: Handler) -> None:
        """Run the handler until its transaction commits, or the entry is dead-lettered."""
        if not entry.fields:  # trimmed from the stream while pending: nothing left to process
            await self.client.xack(self.stream, self.group, entry.entry_id)
            return
        attempts = entry.deliveries
        if attempts > self._max_attempts:  # earlier instances died on it: do not die again
            await self.dead_letter(entry, f"not processed after {attempts - 1} deliveries", cause="deliveries")
            return
        self._retry_backoff.reset()
        while True:
            try:
                async with self.client.pipeline(transaction=True) as tx:
                    await handle(entry, tx)
                    tx.xack(self.stream, self.group, entry.entry_id)
                    await tx.execute()
                break
            except RejectEntry as exc:
                await self.dead_letter(entry, str(exc), cause="rejected")
                return
            except (LakeWriteError, *_REDIS_DOWN):
                raise
            except Exception as exc:  # any handler failure: retried, then dead-lettered
                self.stats.handler_errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                self._metrics.handler_errors(self.stream).inc()
                if attempts >= self._max_attempts:
                    log.error("%s: entry %s failed %d times, moving it to %s: %s", self.group, entry.entry_id,
                              attempts, self._dead_stream, self.stats.last_error)
                    await self.dead_letter(entry, self.stats.last_error, cause="failed")
                    return
                attempts += 1
                if worth_logging(self.stats.handler_errors):
                    log.warning("%s: entry %s failed (attempt %d of %d): %s", self.group, entry.entry_id,
                                attempts - 1, self._max_attempts, self.stats.last_error)
                await asyncio.sleep(self._retry_backoff.next_delay())
        self.stats.consumed += 1
        self._metrics.consumed(self.stream).inc()
        if self._on_commit is not None:  # outside the retry: the entry is acked, it must never run again
            self._on_commit(entry)

    async def dead_letter(self, entry: StreamEntry, reason: str, *, cause: str) -> None:
        """Move the entry to `<stream>:dead` (original fields kept verbatim) and ack it, atomically, with a
        `dead_letter` event on `trading:events`."""
        record = encode_entry({"ts": now_ms(), "source_stream": entry.stream, "source_id": entry.entry_id,
                               "group": self.group, "reason": reason[:2000], "cause": cause,
                               "deliveries": entry.deliveries, "fields": entry.fields})
        async with self.client.pipeline(transaction=True) as tx:
            tx.xadd(self._dead_stream, record, maxlen=self._dead_maxlen, approximate=True)
            tx.xack(self.stream, self.group, entry.entry_id)
            queue_event(tx, "dead_letter", Severity.WARNING, detail={  # the notices relay announces it
                "stream": entry.stream, "group": self.group, "source_id": entry.entry_id, "cause": cause,
                "reason": reason[:500]})
            await tx.execute()
        self.stats.dead_lettered += 1
        self.stats.dead_reasons[cause] = self.stats.dead_reasons.get(cause, 0) + 1
        self._metrics.dead_letters(self.stream, cause).inc()
        if worth_logging(self.stats.dead_lettered):
            log.warning("%s: entry %s of %s dead-lettered (%s): %s", self.group, entry.entry_id, entry.stream,
                        cause, reason)

    # -- idempotency on a natural key ---------------------------------------------------------

    def done_key(self, key: str) -> str:
        """The Redis key of `key`'s idempotency mark, for a caller that reads it in its own pipeline."""
        return self._done_prefix + key

    async def already_done(self, key: str) -> bool:
        return bool(await self.client.exists(self.done_key(key)))

    def mark_done(self, tx: Pipeline, key: str) -> None:
        """Queue the idempotency mark in the entry's transaction."""
        tx.set(self.done_key(key), "1", ex=DONE_TTL_S)

    def skip_duplicate(self) -> None:
        self.stats.duplicates += 1

    # -- gauges -------------------------------------------------------------------------------

    async def refresh_gauges(self) -> None:
        """Pending and lag from the group (Redis 6.2 has no `lag` field: count what follows the cursor)."""
        groups = await self.client.xinfo_groups(self.stream)
        for info in groups:
            if as_text(info["name"]) != self.group:
                continue
            self._metrics.pending(self.stream).set(int(info["pending"]))
            lag = info.get("lag")
            if lag is None:
                after = "(" + as_text(info["last-delivered-id"])
                lag = len(await self.client.xrange(self.stream, min=after, max="+", count=10_000))
            self._metrics.lag(self.stream).set(int(lag))



def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)

