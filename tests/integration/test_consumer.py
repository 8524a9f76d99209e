"""GroupConsumer on a real Redis: ack with the effect, reclaim after a crash, dead letters, retries."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry
from redis.asyncio.client import Pipeline

from trading.backoff import Backoff
from trading.bus import decode_entry, encode_entry
from trading.consumer import ConsumerMetrics, GroupConsumer, RejectEntry, StreamEntry
from trading.metrics import sample_value
from trading.redis_conn import async_client

STREAM = "test:in"
OUT = "test:out"


def _consumer(client: redis.asyncio.Redis, registry: CollectorRegistry, **kwargs: Any) -> GroupConsumer:
    kwargs.setdefault("retry_backoff", Backoff(base_s=0.001, cap_s=0.002))
    return GroupConsumer(client, STREAM, "role", metrics=ConsumerMetrics("t", registry), start_id="0",
                         block_ms=50, **kwargs)


async def _add(client: redis.asyncio.Redis, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        await client.xadd(STREAM, encode_entry({"ts": 1000 + i, "key": f"k{i}"}))


async def _copy_to_out(entry: StreamEntry, tx: Pipeline) -> None:
    tx.xadd(OUT, {"key": entry.fields["key"]})


async def _run_until(consumer: GroupConsumer, handler: Any, done: Any, timeout_s: float = 5.0) -> None:
    task = asyncio.create_task(consumer.run(handler))
    try:
        async with asyncio.timeout(timeout_s):
            while not await done():
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def _out_keys(client: redis.asyncio.Redis) -> list[str]:
    return [fields["key"] for _id, fields in await client.xrange(OUT)]


async def test_effect_and_ack_land_together(redis_db_url: str) -> None:
    client = async_client(redis_db_url)
    registry = CollectorRegistry()
    consumer = _consumer(client, registry)
    await _add(client, 5)

    async def done() -> bool:
        return bool(await client.xlen(OUT) == 5)

    await _run_until(consumer, _copy_to_out, done)
    assert await _out_keys(client) == [f"k{i}" for i in range(5)]
    pending = await client.xpending(STREAM, "role")
    assert pending["pending"] == 0
    assert sample_value(registry, "t_consumed_total", {"stream": STREAM}) == 5
    await consumer.refresh_gauges()
    assert sample_value(registry, "t_consumer_lag", {"stream": STREAM}) == 0
    await client.aclose()


async def test_crash_between_read_and_ack_is_processed_once_after_restart(redis_db_url: str) -> None:
    client = async_client(redis_db_url)
    await _add(client, 3)
    first = _consumer(client, CollectorRegistry())
    await first.ensure_group()
    # The first instance read all three and died before acknowledging (its effects never committed).
    assert len(await first.read_new()) == 3

    second = _consumer(client, CollectorRegistry())
    second.consumer = "restarted-instance"
    await _add(client, 2, start=3)

    async def done() -> bool:
        return bool(await client.xlen(OUT) == 5)

    await _run_until(second, _copy_to_out, done)
    await asyncio.sleep(0.1)  # nothing more may arrive
    assert await _out_keys(client) == [f"k{i}" for i in range(5)]  # once each, in stream order
    assert second.stats.reclaimed == 3
    consumers = {c["name"] for c in await client.xinfo_consumers(STREAM, "role")}
    assert consumers == {"restarted-instance"}  # the dead instance's name is cleaned up
    await client.aclose()


async def test_rejected_entry_goes_to_dead_letter_and_the_loop_goes_on(redis_db_url: str) -> None:
    client = async_client(redis_db_url)
    registry = CollectorRegistry()
    consumer = _consumer(client, registry)
    await _add(client, 3)

    async def reject_k1(entry: StreamEntry, tx: Pipeline) -> None:
        if entry.fields["key"] == "k1":
            raise RejectEntry("field 'amount' is not a decimal: 'abc'")
        await _copy_to_out(entry, tx)

    async def done() -> bool:
        return bool(await client.xlen(OUT) == 2)

    await _run_until(consumer, reject_k1, done)
    assert await _out_keys(client) == ["k0", "k2"]
    dead = await client.xrange(STREAM + ":dead")
    assert len(dead) == 1
    record = decode_entry(dead[0][1])
    assert record["reason"] == "field 'amount' is not a decimal: 'abc'"
    assert record["cause"] == "rejected"
    assert orjson.loads(record["fields"])["key"] == "k1"
    assert (await client.xpending(STREAM, "role"))["pending"] == 0
    assert sample_value(registry, "t_dead_letters_total", {"stream": STREAM, "cause": "rejected"}) == 1
    await client.aclose()


async def test_transient_failure_is_retried_in_place_keeping_order(redis_db_url: str) -> None:
    client = async_client(redis_db_url)
    consumer = _consumer(client, CollectorRegistry(), max_attempts=5)
    await _add(client, 3)
    failures = {"k1": 2}

    async def flaky(entry: StreamEntry, tx: Pipeline) -> None:
        tx.xadd(OUT, {"key": entry.fields["key"]})  # queued, then discarded when the handler fails
        if failures.get(entry.fields["key"], 0) > 0:
            failures[entry.fields["key"]] -= 1
            raise RuntimeError("exchange busy")

    async def done() -> bool:
        return bool(await client.xlen(OUT) == 3)

    await _run_until(consumer, flaky, done)
    assert await _out_keys(client) == ["k0", "k1", "k2"]
    assert consumer.stats.handler_errors == 2
    assert await client.xlen(STREAM + ":dead") == 0
    await client.aclose()


async def test_entry_failing_every_attempt_is_dead_lettered(redis_db_url: str) -> None:
    client = async_client(redis_db_url)
    consumer = _consumer(client, CollectorRegistry(), max_attempts=3)
    await _add(client, 2)

    async def poison_k0(entry: StreamEntry, tx: Pipeline) -> None:
        if entry.fields["key"] == "k0":
            raise RuntimeError("always fails")
        await _copy_to_out(entry, tx)

    async def done() -> bool:
        return bool(await client.xlen(OUT) == 1)

    await _run_until(consumer, poison_k0, done)
    dead = decode_entry((await client.xrange(STREAM + ":dead"))[0][1])
    assert dead["cause"] == "failed" and "always fails" in dead["reason"]
    assert consumer.stats.handler_errors == 3
    await client.aclose()


async def test_entry_that_killed_earlier_instances_is_not_retried_again(redis_db_url: str) -> None:
    client = async_client(redis_db_url)
    await _add(client, 1)
    for name in ("crashed-1", "crashed-2", "crashed-3"):  # three instances died holding it
        dying = _consumer(client, CollectorRegistry(), max_attempts=2)
        dying.consumer = name
        await dying.ensure_group()
        if name == "crashed-1":
            assert len(await dying.read_new()) == 1
        else:
            await client.xautoclaim(STREAM, "role", name, min_idle_time=0, start_id="0-0")
    calls: list[str] = []

    async def record(entry: StreamEntry, tx: Pipeline) -> None:
        calls.append(entry.entry_id)

    consumer = _consumer(client, CollectorRegistry(), max_attempts=2)

    async def done() -> bool:
        return bool(await client.xlen(STREAM + ":dead") == 1)

    await _run_until(consumer, record, done)
    assert calls == []
    assert decode_entry((await client.xrange(STREAM + ":dead"))[0][1])["cause"] == "deliveries"
    await client.aclose()


async def test_idempotency_mark_skips_a_duplicate(redis_db_url: str) -> None:
    client = async_client(redis_db_url)
    consumer = _consumer(client, CollectorRegistry())
    for _ in range(2):  # the same natural key published twice
        await client.xadd(STREAM, encode_entry({"ts": 1, "key": "same"}))

    async def once(entry: StreamEntry, tx: Pipeline) -> None:
        if await consumer.already_done(entry.fields["key"]):
            consumer.skip_duplicate()
            return
        consumer.mark_done(tx, entry.fields["key"])
        await _copy_to_out(entry, tx)

    async def done() -> bool:
        return consumer.stats.consumed == 2

    await _run_until(consumer, once, done)
    assert await _out_keys(client) == ["same"]
    assert consumer.stats.duplicates == 1
    await client.aclose()


async def test_a_lake_failure_stops_the_loop_instead_of_being_retried_as_redis_down(redis_db_url: str) -> None:
    from trading.lake import LakeWriteError

    client = async_client(redis_db_url)
    consumer = _consumer(client, CollectorRegistry())
    await _add(client, 1)

    async def disk_full(entry: StreamEntry, tx: Pipeline) -> None:
        raise LakeWriteError(28, "No space left on device: batch NOT recorded")

    with pytest.raises(LakeWriteError):
        async with asyncio.timeout(5):
            await consumer.run(disk_full)
    assert (await client.xpending(STREAM, "role"))["pending"] == 1  # not acked: processed after the fix
    await client.aclose()


async def test_on_commit_runs_once_per_committed_entry_and_never_retries_it(redis_db_url: str) -> None:
    client = async_client(redis_db_url)
    committed: list[str] = []

    def on_commit(entry: StreamEntry) -> None:
        committed.append(entry.fields["key"])
        if entry.fields["key"] == "k2":
            raise RuntimeError("lake copy failed")  # stops the loop: the entry is acked and done

    consumer = GroupConsumer(client, STREAM, "role", metrics=ConsumerMetrics("t", CollectorRegistry()),
                             start_id="0", block_ms=50, on_commit=on_commit)
    await _add(client, 4)

    async def reject_k1(entry: StreamEntry, tx: Pipeline) -> None:
        if entry.fields["key"] == "k1":
            raise RejectEntry("bad")
        await _copy_to_out(entry, tx)

    with pytest.raises(RuntimeError, match="lake copy failed"):
        async with asyncio.timeout(5):
            await consumer.run(reject_k1)
    assert committed == ["k0", "k2"]  # not the dead-lettered k1; k2 once, not retried; the loop stopped
    assert await _out_keys(client) == ["k0", "k2"]
    await client.aclose()


async def test_an_orderly_stop_does_not_count_as_a_delivery(client: redis.asyncio.Redis) -> None:
    """Stopped (cancelled) again and again in the middle of its batch, a consumer never dead-letters good
    entries for "too many deliveries": only runs that died holding an entry count against it."""
    for n in range(5):
        await client.xadd(STREAM, {"n": str(n)})
    handled: list[str] = []
    gate = asyncio.Event()

    async def slow(entry: StreamEntry, tx: Any) -> None:
        handled.append(entry.fields["n"])
        await gate.wait()  # never set: every run is cancelled holding its first entry

    for _ in range(8):  # more stops than max_attempts (5)
        consumer = GroupConsumer(client, STREAM, "group", metrics=ConsumerMetrics("x", CollectorRegistry()),
                                 start_id="0", block_ms=50)
        task = asyncio.create_task(consumer.run(slow))
        async with asyncio.timeout(10):
            while len(handled) < 1:
                await asyncio.sleep(0.01)
        handled.clear()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    pending = await client.xpending_range(STREAM, "group", min="-", max="+", count=10)
    assert len(pending) == 5 and max(int(p["times_delivered"]) for p in pending) <= 2
    done: list[str] = []

    async def record(entry: StreamEntry, tx: Any) -> None:
        done.append(entry.fields["n"])

    consumer = GroupConsumer(client, STREAM, "group", metrics=ConsumerMetrics("x", CollectorRegistry()),
                             start_id="0", block_ms=50)
    task = asyncio.create_task(consumer.run(record))
    try:
        async with asyncio.timeout(10):
            while len(done) < 5:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert done == ["0", "1", "2", "3", "4"] and await client.xlen(STREAM + ":dead") == 0
