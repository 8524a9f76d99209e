import asyncio
import os
import socket

import pytest
import redis.asyncio

from trading.lease import LeaseHeldError, LeaseLostError, RedisLease
from trading.redis_conn import EmbeddedRedis, async_client

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
    assert await slow.renew() is False
    assert slow.lease is None
    assert await slow.release() is False
    assert await taker.holder() is not None  # the stale holder did not delete the new one's lease


async def test_a_lease_that_vanished_with_nobody_else_holding_it_is_taken_back(client: redis.asyncio.Redis) -> None:
    lease = RedisLease(client, "ingest", ttl_ms=5000)
    held = await lease.acquire()
    await client.flushdb()                     # what a Redis restart without persistence leaves
    assert await lease.renew() is True
    assert lease.lease == held
    other = RedisLease(client, "ingest", ttl_ms=5000)
    with pytest.raises(LeaseHeldError):
        await other.acquire()                  # it is really held again


async def test_release_by_a_stale_token_leaves_the_new_holder_alone(client: redis.asyncio.Redis) -> None:
    stale = RedisLease(client, "core", ttl_ms=150)
    await stale.acquire()
    await asyncio.sleep(0.3)
    fresh = RedisLease(client, "core")
    await fresh.acquire()
    assert await stale.release() is False
    assert await client.exists("lease:core") == 1
    assert await fresh.renew() is True


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


async def test_keep_renewed_gives_up_when_redis_is_down_for_a_ttl() -> None:
    server = EmbeddedRedis()
    server.start()
    client = async_client(server.url)
    try:
        lease = RedisLease(client, "ingest-book", ttl_ms=400)
        await lease.acquire()
        server.stop()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(LeaseLostError, match="not renewed for 400 ms"):
            await asyncio.wait_for(lease.keep_renewed(every_s=0.05), timeout=10)
        assert loop.time() - started < 1.5  # about when the lease may have expired, not after client retries
        assert lease.lease is None
    finally:
        await client.aclose()
        server.stop()
