"""The ingest sink against a real Redis: lake first, Redis in the background, bounded backlog."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from trading.bus import STREAM_BOOK, EntryEncodeError, StreamPublisher
from trading.ingest.runner import IngestSink
from trading.lake import LakeWriteError, lake_file_path, read_jsonl
from trading.redis_conn import EmbeddedRedis, sync_client

pytestmark = pytest.mark.integration

T0 = 1_758_600_000_000


def _row(nonce: int) -> dict[str, object]:
    return {"v": 1, "ts": T0, "recv_ts": T0, "market": "BTC-EUR", "nonce": nonce}


async def test_rows_reach_the_lake_then_redis_in_order(redis_db_url: str, tmp_path: Path) -> None:
    publisher = StreamPublisher(redis_db_url, batch_size=4)
    sink = IngestSink(tmp_path, publisher)
    try:
        for nonce in range(10):
            sink.emit("orderbook/top", _row(nonce), STREAM_BOOK)
        sink.emit_encoded("orderbook/top", T0, b'{"v":1,"ts":%d,"recv_ts":%d,"market":"BTC-EUR","nonce":10}\n'
                          % (T0, T0), STREAM_BOOK,
                          b'["v","1","ts","%d","recv_ts","%d","market","BTC-EUR","nonce","10"]' % (T0, T0))
        assert not lake_file_path(tmp_path, "orderbook/top", T0).exists() and publisher.unsent == 0
        sink.flush()
        assert [r["nonce"] for r in read_jsonl(lake_file_path(tmp_path, "orderbook/top", T0))] == list(range(11))
        assert publisher.unsent == 11  # released: written in the background
    finally:
        sink.close()
        await publisher.aclose()
    client = sync_client(redis_db_url)
    try:
        assert [int(f["nonce"]) for _, f in client.xrange(STREAM_BOOK)] == list(range(11))
    finally:
        client.close()
    assert sink.rows_written == 11 and sink.streams == {STREAM_BOOK}


async def test_a_disk_error_raises_and_redis_never_gets_what_the_lake_lacks(redis_db_url: str,
                                                                           tmp_path: Path) -> None:
    path = lake_file_path(tmp_path, "orderbook/top", T0)
    path.parent.mkdir(parents=True)
    path.symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    publisher = StreamPublisher(redis_db_url)
    sink = IngestSink(tmp_path, publisher)
    try:
        sink.emit("orderbook/top", _row(1), STREAM_BOOK)
        with pytest.raises(LakeWriteError, match="No space left"):
            sink.flush()
        assert publisher.pending == 0 and publisher.stats.entries_dropped == 1
    finally:
        sink.close()
        await publisher.aclose()
    client = sync_client(redis_db_url)
    try:
        assert client.xlen(STREAM_BOOK) == 0
    finally:
        client.close()


async def test_a_row_the_stream_cannot_carry_is_refused_by_both(redis_db_url: str, tmp_path: Path) -> None:
    publisher = StreamPublisher(redis_db_url)
    sink = IngestSink(tmp_path, publisher)
    try:
        with pytest.raises(EntryEncodeError, match="float"):
            sink.emit("orderbook/top", {**_row(1), "bid": 1.5}, STREAM_BOOK)
        sink.emit("orderbook/top", _row(2), STREAM_BOOK)
        sink.flush()
    finally:
        sink.close()
        await publisher.aclose()
    assert [r["nonce"] for r in read_jsonl(lake_file_path(tmp_path, "orderbook/top", T0))] == [2]
    assert publisher.stats.entries_written == 1


async def test_backpressure_asks_for_flushes_and_holds_the_reader_while_redis_is_behind(tmp_path: Path) -> None:
    server = EmbeddedRedis()
    server.start()
    assert server.pid is not None
    publisher = StreamPublisher(server.url, batch_size=5, timeout_s=10.0)
    sink = IngestSink(tmp_path, publisher, flush_rows=10, high_water=20)
    try:
        for nonce in range(9):
            sink.emit("orderbook/top", _row(nonce), STREAM_BOOK)
            assert sink.backpressure() is None
        sink.emit("orderbook/top", _row(9), STREAM_BOOK)
        pause = sink.backpressure()
        assert pause is not None  # a flush is due: the reader yields once
        await pause
        await asyncio.wait_for(sink.wait_flush_due(60), 1)  # the flush loop is woken, not left to its timer
        os.kill(server.pid, signal.SIGSTOP)
        try:
            sink.flush()
            for nonce in range(10, 30):
                sink.emit("orderbook/top", _row(nonce), STREAM_BOOK)
            sink.flush()
            assert publisher.unsent >= 20
            for nonce in range(30, 40):
                sink.emit("orderbook/top", _row(nonce), STREAM_BOOK)
            held = sink.backpressure()
            assert held is not None
            waiting = asyncio.ensure_future(held)
            await asyncio.sleep(0.3)
            assert not waiting.done()  # Redis is stalled: the reader stays held
        finally:
            os.kill(server.pid, signal.SIGCONT)
        await asyncio.wait_for(waiting, 5)
        assert publisher.unsent < 20
    finally:
        sink.close()
        await publisher.aclose()
        server.stop()
    assert publisher.stats.entries_written == 40
