import asyncio
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from trading.lease import LEASE_KEY_PREFIX, LeaseHeldError, LeaseLostError, RedisLease, Renewal
from trading.redis_conn import CommandGate, EmbeddedRedis, async_client, command_gate, dedicated_client

pytestmark = pytest.mark.integration



async def test_acquire_stores_the_holder_and_returns_a_fencing_token(client: redis.asyncio.Redis) -> None:
    lease = RedisLease(client, "ingest-book", ttl_ms=5000)
    acquired = await lease.acquire()
    assert acquired.fencing_token == 1
    holder = await lease.holder()
    assert holder is not None
    assert (holder.host, holder.pid) == (socket.gethostname(), os.getpid())
    assert 0 < await client.pttl("lease:ingest-book") <= 5000


async def test_a_second_instance_is_refused_with_the_holder_named(client: redis.asyncio.Redis) -> None:
    await RedisLease(client, "ingest-book").acquire()
    other = RedisLease(client, "ingest-book")
    assert await other.try_acquire() is None
    with pytest.raises(LeaseHeldError, match=rf"held by host={socket.gethostname()} pid={os.getpid()}") as caught:
        await other.acquire()
    assert caught.value.holder is not None and caught.value.holder.pid == os.getpid()
    assert other.lease is None


async def test_fencing_token_grows_with_every_acquisition(client: redis.asyncio.Redis) -> None:
    lease = RedisLease(client, "executor")
    tokens = []
    for _ in range(3):
        tokens.append((await lease.acquire()).fencing_token)
        assert await lease.release()
    assert tokens == [1, 2, 3]


async def test_acquire_waits_for_the_holder_to_release(client: redis.asyncio.Redis) -> None:
    first, second = RedisLease(client, "pnl"), RedisLease(client, "pnl")
    await first.acquire()

    async def release_soon() -> None:
        await asyncio.sleep(0.2)
        await first.release()

    releaser = asyncio.create_task(release_soon())
    acquired = await second.acquire(wait_s=5, poll_s=0.05)
    await releaser
    assert acquired.fencing_token == 2


async def test_acquire_gives_up_after_wait_s(client: redis.asyncio.Redis) -> None:
    await RedisLease(client, "pnl").acquire()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(LeaseHeldError):
        await RedisLease(client, "pnl").acquire(wait_s=0.3, poll_s=0.05)
    assert 0.3 <= loop.time() - started < 2


async def test_an_expired_lease_is_lost_and_cannot_be_renewed_or_released(client: redis.asyncio.Redis) -> None:
    slow = RedisLease(client, "signal", ttl_ms=150)
    await slow.acquire()
    await asyncio.sleep(0.3)
    taker = RedisLease(client, "signal", ttl_ms=5000)
    taken = await taker.acquire()
    assert taken.fencing_token == 2
    assert await slow.renew() is Renewal.TAKEN
    assert slow.lease is None
    assert await slow.release() is False
    assert await taker.holder() is not None  # the stale holder did not delete the new one's lease


async def test_a_lease_that_vanished_with_nobody_else_holding_it_is_reacquired_with_a_new_token(
        client: redis.asyncio.Redis) -> None:
    lease = RedisLease(client, "ingest", ttl_ms=5000)
    await client.set("lease:ingest:fencing", 4)  # four acquisitions before ours
    held = await lease.acquire()
    assert held.fencing_token == 5
    await client.flushdb()                     # what a Redis restart without persistence leaves
    assert await lease.renew() is Renewal.GONE  # never taken back under the old token
    again = await lease.reacquire()
    assert again.fencing_token == 6            # the lost counter goes on from ours, never back
    assert await client.get("lease:ingest:fencing") == "6"
    other = RedisLease(client, "ingest", ttl_ms=5000)
    with pytest.raises(LeaseHeldError):
        await other.acquire()                  # it is really held again


async def test_reacquire_refuses_when_another_instance_held_the_lease_meanwhile(client: redis.asyncio.Redis) -> None:
    lease = RedisLease(client, "executor", ttl_ms=150)
    await lease.acquire()
    await asyncio.sleep(0.3)                   # expired while Redis was away
    other = RedisLease(client, "executor")
    await other.acquire()
    await other.release()                      # and gone again: only the fencing counter remembers it
    with pytest.raises(LeaseLostError, match=r"fencing token 2 > ours, 1"):
        await lease.reacquire()
    assert lease.lease is None
    await RedisLease(client, "executor").acquire()
    with pytest.raises(LeaseLostError, match="not held by this instance"):
        await lease.reacquire()


async def test_release_by_a_stale_token_leaves_the_new_holder_alone(client: redis.asyncio.Redis) -> None:
    stale = RedisLease(client, "core", ttl_ms=150)
    await stale.acquire()
    await asyncio.sleep(0.3)
    fresh = RedisLease(client, "core")
    await fresh.acquire()
    assert await stale.release() is False
    assert await client.exists("lease:core") == 1
    assert await fresh.renew() is Renewal.EXTENDED


async def test_keep_renewed_holds_the_lease_beyond_its_ttl(client: redis.asyncio.Redis) -> None:
    lease = RedisLease(client, "ingest-ticker", ttl_ms=300)
    await lease.acquire()
    renewer = asyncio.create_task(lease.keep_renewed(every_s=0.05))
    await asyncio.sleep(0.8)
    assert await RedisLease(client, "ingest-ticker").try_acquire() is None
    renewer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await renewer


async def test_keep_renewed_raises_when_the_lease_was_taken(client: redis.asyncio.Redis) -> None:
    lease = RedisLease(client, "ingest-candles", ttl_ms=5000)
    await lease.acquire()
    await client.delete("lease:ingest-candles")  # e.g. expired while the process was frozen
    await RedisLease(client, "ingest-candles").acquire()

    async def work() -> None:
        await asyncio.sleep(10)

    with pytest.raises(ExceptionGroup) as caught:
        async with asyncio.TaskGroup() as group:
            group.create_task(lease.keep_renewed(every_s=0.05))
            worker = group.create_task(work())
    assert caught.group_contains(LeaseLostError)
    assert worker.cancelled()  # losing the lease stopped the work


async def test_keep_renewed_pauses_while_redis_is_down_and_gives_up_after_the_limit() -> None:
    server = EmbeddedRedis()
    server.start()
    client = async_client(server.url)
    gate = CommandGate()
    try:
        lease = RedisLease(client, "ingest-book", ttl_ms=400)
        await lease.acquire()
        renewer = asyncio.create_task(lease.keep_renewed(gate=gate, give_up_s=1.0))
        await asyncio.sleep(0.1)
        assert gate.is_open()
        server.stop()
        loop = asyncio.get_running_loop()
        started = loop.time()
        while gate.is_open():
            await asyncio.sleep(0.01)
        assert loop.time() - started < 400 / 3000 + 0.1  # shut before the lease could expire
        with pytest.raises(LeaseLostError, match=r"not re-acquired within 1 s"):
            await asyncio.wait_for(renewer, timeout=10)
        assert 1.0 <= loop.time() - started < 2.5
        assert lease.lease is None and not gate.is_open()
    finally:
        await client.aclose()
        server.stop()


async def test_the_gate_shuts_by_itself_when_the_renewer_is_late(client: redis.asyncio.Redis) -> None:
    gate = command_gate(client)
    assert gate is not None
    own = dedicated_client(client, socket_timeout=1.0)  # the lease's own connections are never gated
    try:
        lease = RedisLease(own, "signal", ttl_ms=300)
        await lease.acquire()
        gate.open_until(lease.confirmed_at + lease.held_for_s)
        time.sleep(0.15)                       # the event loop was busy: nobody renewed
        waiting: asyncio.Future[Any] = asyncio.ensure_future(client.ping())
        await asyncio.sleep(0.1)
        assert not waiting.done()              # the command waits at the gate
        assert await lease.renew() is Renewal.EXTENDED
        gate.open_until(lease.confirmed_at + lease.held_for_s)
        assert await asyncio.wait_for(waiting, timeout=2)
    finally:
        await own.aclose()


async def test_a_redis_restart_pauses_the_holder_and_it_reacquires_with_a_new_token(tmp_path: Path) -> None:
    server = EmbeddedRedis(data_dir=tmp_path / "redis")  # AOF: the lease key and its counter survive
    server.start()
    client = async_client(server.url)
    own = dedicated_client(client, socket_timeout=0.3)
    gate = command_gate(client)
    assert gate is not None
    try:
        lease = RedisLease(own, "executor", ttl_ms=1500)
        first = await lease.acquire()
        renewer = asyncio.create_task(lease.keep_renewed(gate=gate))
        await client.set("work", "before")
        server.kill()
        while gate.is_open():
            await asyncio.sleep(0.01)
        # Waits at the gate, not failing.
        write: asyncio.Future[Any] = asyncio.ensure_future(client.set("work", "during"))
        await asyncio.sleep(0.5)
        assert not write.done()
        server.start()
        await asyncio.wait_for(write, timeout=5)  # sent once the lease is ours again, on a fresh connection
        assert lease.lease is not None and lease.lease.fencing_token == first.fencing_token + 1
        assert len(lease.pauses) == 1 and not renewer.done()
        assert await client.get("work") == "during"
        renewer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await renewer
    finally:
        await own.aclose()
        await client.aclose()
        server.stop()


async def test_another_holder_found_after_an_outage_stops_the_loop(tmp_path: Path) -> None:
    server = EmbeddedRedis(data_dir=tmp_path / "redis")
    server.start()
    client = async_client(server.url)
    own = dedicated_client(client, socket_timeout=0.2)
    try:
        lease = RedisLease(own, "pnl", ttl_ms=600)
        await lease.acquire()
        renewer = asyncio.create_task(lease.keep_renewed(gate=command_gate(client)))
        server.kill()
        await asyncio.sleep(0.8)              # the key expires (its TTL is kept in the AOF)
        server.start()
        # Another instance acquires it as Redis comes back, before the keeper can (this blocking client runs
        # before the event loop does again): what the acquire script does, the holder named as it names it.
        other = redis.Redis.from_url(server.url)
        try:
            holder = {"token": "other", "host": "other-host", "pid": 1, "started_ms": int(time.time() * 1000)}
            assert other.set(LEASE_KEY_PREFIX + "pnl", json.dumps(holder), nx=True, px=60_000)
            assert other.incr(LEASE_KEY_PREFIX + "pnl:fencing") == 2
        finally:
            other.close()
        with pytest.raises(LeaseLostError, match="held by host=other-host"):
            await asyncio.wait_for(renewer, timeout=5)
    finally:
        await own.aclose()
        await client.aclose()
        server.stop()


async def test_acquire_waits_for_redis_to_come_back(tmp_path: Path) -> None:
    server = EmbeddedRedis(data_dir=tmp_path / "redis")
    server.start()
    client = async_client(server.url)
    try:
        server.kill()
        acquiring = asyncio.create_task(RedisLease(client, "trading-core").acquire(poll_s=0.05))
        await asyncio.sleep(0.5)
        assert not acquiring.done()
        server.start()
        assert (await asyncio.wait_for(acquiring, timeout=5)).fencing_token == 1
    finally:
        await client.aclose()
        server.stop()
