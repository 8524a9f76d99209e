import asyncio
import os
import random
import signal
from decimal import Decimal

import pytest

from trading.backoff import Backoff
from trading.bus import (
    BOOK_SCHEMA,
    ORDERBOOK_UPDATE_SCHEMA,
    STREAM_BOOK,
    STREAM_ORDERBOOK_UPDATE,
    EntryEncodeError,
    StreamPublisher,
    decode_entry,
)
from trading.redis_conn import EmbeddedRedis, sync_client

pytestmark = pytest.mark.integration

T0 = 1_758_600_000_000


def _top(nonce: int) -> dict[str, object]:
    return {"ts": T0 + nonce, "recv_ts": T0 + nonce + 3, "market": "BTC-EUR", "nonce": nonce,
            "bid": Decimal("75516.10"), "bid_size": "0.5", "ask": Decimal("75517"), "ask_size": "1.25"}


class _NoJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def _fixed_backoff(delay_s: float) -> Backoff:
    return Backoff(base_s=delay_s, cap_s=delay_s, rng=_NoJitter())


async def test_entries_arrive_in_order_and_decode_back(redis_db_url: str) -> None:
    async with StreamPublisher(redis_db_url, batch_size=4) as publisher:
        assert not publisher.redis_up  # unknown until a write succeeds
        for nonce in range(10):
            await publisher.publish(STREAM_BOOK, _top(nonce))
        await publisher.publish(STREAM_ORDERBOOK_UPDATE, {"ts": T0, "recv_ts": T0 + 1, "market": "BTC-EUR",
                                                          "nonce": 10, "bids": [["75516.10", "0.5"]], "asks": []})
        assert publisher.pending == 3  # two full batches of 4 were handed to writes; the rest waits
        assert await publisher.flush() is True
        assert publisher.redis_up
    assert publisher.stats.entries_written == 11 and publisher.stats.batches_written == 3
    client = sync_client(redis_db_url)
    try:
        entries = client.xrange(STREAM_BOOK)
        decoded = [decode_entry(fields, BOOK_SCHEMA) for _, fields in entries]
        assert [e["nonce"] for e in decoded] == list(range(10))
        assert decoded[0] == {"v": 1, "ts": T0, "recv_ts": T0 + 3, "market": "BTC-EUR", "nonce": 0,
                              "bid": Decimal("75516.1"), "bid_size": Decimal("0.5"), "ask": Decimal(75517),
                              "ask_size": Decimal("1.25")}
        assert list(entries[0][1]) == ["v", "ts", "recv_ts", "market", "nonce", "bid", "bid_size", "ask", "ask_size"]
        [(_, update)] = client.xrange(STREAM_ORDERBOOK_UPDATE)
        assert decode_entry(update, ORDERBOOK_UPDATE_SCHEMA)["bids"] == [["75516.10", "0.5"]]
    finally:
        client.close()


async def test_streams_are_trimmed_to_an_approximate_maxlen_per_stream(redis_db_url: str) -> None:
    async with StreamPublisher(redis_db_url, maxlen=100, maxlen_by_stream={"short": 10}, batch_size=50) as publisher:
        for nonce in range(2000):
            await publisher.publish("long", _top(nonce))
            await publisher.publish("short", _top(nonce))
    client = sync_client(redis_db_url)
    try:
        # MAXLEN ~ trims whole macro nodes only, so lengths stay near, never far above, the cap.
        assert 100 <= client.xlen("long") <= 300
        assert 10 <= client.xlen("short") <= 200
        assert int(client.xrange("long", count=1)[0][1]["nonce"]) > 1000
    finally:
        client.close()


async def test_flushing_nothing_is_a_no_op(redis_db_url: str) -> None:
    async with StreamPublisher(redis_db_url) as publisher:
        assert await publisher.flush() is True
        assert publisher.stats.batches_written == 0


async def test_publisher_survives_a_redis_outage_and_resumes_on_the_same_port() -> None:
    server = EmbeddedRedis()
    server.start()
    publisher = StreamPublisher(server.url, batch_size=5, timeout_s=1.0, backoff=_fixed_backoff(0.1))
    try:
        for nonce in range(5):
            await publisher.publish(STREAM_BOOK, _top(nonce))
        assert await publisher.flush()
        assert publisher.redis_up and publisher.stats.entries_written == 5

        server.stop()
        for nonce in range(5, 15):  # two batches: the first fails, the second is dropped while backing off
            await publisher.publish(STREAM_BOOK, _top(nonce))
        assert await publisher.flush() is False
        assert not publisher.redis_up
        assert publisher.stats.batches_failed == 1
        assert publisher.stats.entries_dropped == 10
        assert "Connection" in publisher.stats.last_error

        server = EmbeddedRedis(port=server.port)
        server.start()
        await asyncio.sleep(0.15)  # past the backoff window
        for nonce in range(15, 20):
            await publisher.publish(STREAM_BOOK, _top(nonce))
        assert await publisher.flush()
        assert publisher.redis_up
        assert publisher.stats.reconnects == 1
        assert publisher.stats.entries_written == 10
        client = sync_client(server.url)
        try:
            assert [int(fields["nonce"]) for _, fields in client.xrange(STREAM_BOOK)] == list(range(15, 20))
        finally:
            client.close()
    finally:
        await publisher.aclose()
        server.stop()


async def test_an_entry_the_contract_cannot_carry_is_refused_and_nothing_else_is_lost(redis_db_url: str) -> None:
    async with StreamPublisher(redis_db_url) as publisher:
        await publisher.publish(STREAM_BOOK, _top(1))
        with pytest.raises(EntryEncodeError, match="float"):
            await publisher.publish(STREAM_BOOK, {**_top(2), "bid": 75516.1})
        assert publisher.pending == 1
    client = sync_client(redis_db_url)
    try:
        assert [fields["nonce"] for _, fields in client.xrange(STREAM_BOOK)] == ["1"]
    finally:
        client.close()


async def test_a_hung_redis_times_out_instead_of_stalling_the_publisher() -> None:
    server = EmbeddedRedis()
    server.start()
    publisher = StreamPublisher(server.url, batch_size=1, timeout_s=0.3, backoff=_fixed_backoff(0.05))
    assert server.pid is not None
    try:
        await publisher.publish(STREAM_BOOK, _top(1))
        assert await publisher.flush()
        os.kill(server.pid, signal.SIGSTOP)  # alive but not answering
        try:
            await publisher.publish(STREAM_BOOK, _top(2))
            assert await publisher.flush() is False
            assert publisher.stats.last_error.startswith("TimeoutError")
            assert not publisher.redis_up
        finally:
            os.kill(server.pid, signal.SIGCONT)
        await asyncio.sleep(0.1)
        await publisher.publish(STREAM_BOOK, _top(3))
        assert await publisher.flush()
        assert publisher.stats.reconnects == 1
    finally:
        await publisher.aclose()
        server.stop()


async def test_a_caller_timeout_neither_breaks_the_publisher_nor_loses_entries() -> None:
    server = EmbeddedRedis()
    server.start()
    publisher = StreamPublisher(server.url, batch_size=1, timeout_s=5.0)
    assert server.pid is not None
    try:
        os.kill(server.pid, signal.SIGSTOP)
        try:
            await publisher.publish(STREAM_BOOK, _top(1))  # its write is now in flight, waiting
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(publisher.publish(STREAM_BOOK, _top(2)), timeout=0.2)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        await publisher.publish(STREAM_BOOK, _top(3))
        assert await publisher.flush()
        client = sync_client(server.url)
        try:
            # Entry 2 was buffered when its caller gave up waiting for the batch ahead; it went out next.
            assert [fields["nonce"] for _, fields in client.xrange(STREAM_BOOK)] == ["1", "2", "3"]
        finally:
            client.close()
    finally:
        await publisher.aclose()
        server.stop()


async def test_added_entries_wait_for_release_then_go_out_in_order_per_stream(redis_db_url: str) -> None:
    client = sync_client(redis_db_url)
    async with StreamPublisher(redis_db_url, batch_size=3, batches_per_call=2) as publisher:
        for nonce in range(10):
            publisher.add("a", _top(nonce))
            publisher.add("b", _top(100 + nonce))
        await asyncio.sleep(0.05)
        assert publisher.pending == 20 and publisher.unsent == 0
        assert client.xlen("a") == 0  # nothing leaves before release()
        publisher.release()
        assert publisher.pending == 0 and publisher.unsent == 20
        await publisher.wait_unsent_below(1)
        assert publisher.unsent == 0
    try:
        assert [int(f["nonce"]) for _, f in client.xrange("a")] == list(range(10))
        assert [int(f["nonce"]) for _, f in client.xrange("b")] == list(range(100, 110))
        # 7 batches (the last one partial), sent two per call when they queue up
        assert publisher.stats.batches_written == 7 and publisher.stats.entries_written == 20
    finally:
        client.close()


async def test_dropped_pending_entries_are_counted_and_never_sent(redis_db_url: str) -> None:
    async with StreamPublisher(redis_db_url) as publisher:
        publisher.add(STREAM_BOOK, _top(1))
        publisher.drop_pending()
        publisher.add(STREAM_BOOK, _top(2))
    assert publisher.stats.entries_dropped == 1 and publisher.stats.entries_written == 1
    client = sync_client(redis_db_url)
    try:
        assert [fields["nonce"] for _, fields in client.xrange(STREAM_BOOK)] == ["2"]
    finally:
        client.close()


async def test_waiting_for_room_lasts_until_a_stalled_redis_answers() -> None:
    server = EmbeddedRedis()
    server.start()
    publisher = StreamPublisher(server.url, batch_size=2, timeout_s=10.0)
    assert server.pid is not None
    try:
        for nonce in range(6):
            publisher.add(STREAM_BOOK, _top(nonce))
        os.kill(server.pid, signal.SIGSTOP)
        try:
            publisher.release()
            room = asyncio.ensure_future(publisher.wait_unsent_below(3))
            await asyncio.sleep(0.3)
            assert not room.done() and publisher.unsent == 6
        finally:
            os.kill(server.pid, signal.SIGCONT)
        await asyncio.wait_for(room, 5)
        assert await publisher.flush()
        assert publisher.stats.entries_written == 6
    finally:
        await publisher.aclose()
        server.stop()
