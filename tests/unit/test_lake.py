import errno
import os
from datetime import date
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from trading.lake import (
    LakeFormatError,
    LakeLockedError,
    LakeWriteError,
    LakeWriter,
    TornTail,
    TornTailError,
    channel_files,
    lake_file_path,
    read_jsonl,
    recover_torn_tail,
)

T0 = 1_758_600_000_000  # 2025-09-23T04:00:00Z
HOUR = 3_600_000
MIDNIGHT = 1_758_672_000_000  # 2025-09-24T00:00:00Z


def _rows(n: int, recv_ts: int = T0) -> list[dict[str, object]]:
    return [{"v": 1, "ts": recv_ts - 5, "recv_ts": recv_ts, "market": "BTC-EUR", "nonce": i} for i in range(n)]


def test_file_layout_is_utc_day_channel_and_hour(tmp_path: Path) -> None:
    assert lake_file_path(tmp_path, "orderbook/update", T0) == (
        tmp_path / "2025-09-23" / "orderbook" / "update" / "orderbook-update.2025-09-23T04.jsonl")
    assert lake_file_path(tmp_path, "candles/1m", MIDNIGHT - 1, hourly=False) == (
        tmp_path / "2025-09-23" / "candles" / "1m" / "candles-1m.2025-09-23.jsonl")


@pytest.mark.parametrize("channel", ["", "/abs", "a/../b", "Orderbook", "a//b", "a/"])
def test_bad_channel_names_are_refused(tmp_path: Path, channel: str) -> None:
    with pytest.raises(ValueError, match="lake channel"):
        LakeWriter(tmp_path, channel)


def test_rows_round_trip_with_decimals_as_strings(tmp_path: Path) -> None:
    with LakeWriter(tmp_path, "orderbook/top") as writer:
        row = {"recv_ts": T0, "ts": T0, "bid": Decimal("75516.10"), "levels": [[Decimal("1"), "2"]]}
        assert writer.write_batch([row]) == 1
        writer.write_batch(_rows(3))
        path = writer.path_for(T0)
    rows = list(read_jsonl(path))
    assert rows[0] == {"recv_ts": T0, "ts": T0, "bid": "75516.1", "levels": [["1", "2"]]}
    assert [r["nonce"] for r in rows[1:]] == [0, 1, 2]
    assert writer.stats.rows_written == 4 and writer.stats.batches_written == 2


def test_each_batch_is_on_disk_before_write_batch_returns(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path, "ticker24h")
    try:
        writer.write_batch(_rows(2))
        assert len(writer.path_for(T0).read_bytes().splitlines()) == 2
    finally:
        writer.close()


def test_rows_go_to_the_file_of_their_recv_ts_across_hour_and_midnight(tmp_path: Path) -> None:
    late, next_hour, next_day = MIDNIGHT - HOUR - 1, MIDNIGHT - 1, MIDNIGHT
    with LakeWriter(tmp_path, "ticker24h") as writer:
        writer.write_batch(_rows(1, late) + _rows(2, next_hour) + _rows(1, next_day))
    assert [p.name for p in channel_files(tmp_path, date(2025, 9, 23), "ticker24h")] == [
        "ticker24h.2025-09-23T22.jsonl", "ticker24h.2025-09-23T23.jsonl"]
    assert [p.name for p in channel_files(tmp_path, date(2025, 9, 24), "ticker24h")] == [
        "ticker24h.2025-09-24T00.jsonl"]
    assert len(list(read_jsonl(lake_file_path(tmp_path, "ticker24h", next_hour)))) == 2


def test_ts_is_used_without_recv_ts_and_ts_ms_overrides_both(tmp_path: Path) -> None:
    with LakeWriter(tmp_path, "events") as writer:
        writer.write_batch([{"ts": T0, "type": "reject"}])
        writer.write_batch([{"type": "note"}], ts_ms=T0 + HOUR)
        with pytest.raises(LakeFormatError, match="none of"):
            writer.write_batch([{"type": "no time"}])
        with pytest.raises(LakeFormatError, match="int ms"):
            writer.write_batch([{"ts": "1758600000000"}])
    assert len(list(read_jsonl(lake_file_path(tmp_path, "events", T0)))) == 1
    assert len(list(read_jsonl(lake_file_path(tmp_path, "events", T0 + HOUR)))) == 1


def test_an_unserializable_batch_writes_nothing(tmp_path: Path) -> None:
    with LakeWriter(tmp_path, "events") as writer, pytest.raises(LakeFormatError, match="serializable"):
        writer.write_batch([{"ts": T0}, {"ts": T0, "x": object()}])
    assert not lake_file_path(tmp_path, "events", T0).exists()


def test_a_second_writer_of_the_same_file_fails_loudly(tmp_path: Path) -> None:
    with LakeWriter(tmp_path, "ticker24h") as first:
        first.write_batch(_rows(1))
        second = LakeWriter(tmp_path, "ticker24h")
        with pytest.raises(LakeLockedError, match="another lake writer"):
            second.write_batch(_rows(1))
    # Once the first writer closed the file, the next one may take it.
    with LakeWriter(tmp_path, "ticker24h") as third:
        third.write_batch(_rows(1))
    assert len(list(read_jsonl(lake_file_path(tmp_path, "ticker24h", T0)))) == 2


@pytest.mark.parametrize("fragment", [b'{"recv_ts": 1, "nonce": 9', b'{"recv_ts":1}'])
def test_a_torn_last_line_is_quarantined_when_the_writer_opens_the_file(tmp_path: Path, fragment: bytes) -> None:
    path = lake_file_path(tmp_path, "ticker24h", T0)
    path.parent.mkdir(parents=True)
    good = b'{"recv_ts":1,"nonce":1}\n'
    path.write_bytes(good + fragment)  # a crash mid-write; even complete JSON without "\n" is torn
    with LakeWriter(tmp_path, "ticker24h") as writer:
        writer.write_batch(_rows(1))
    assert writer.stats.torn_tails_quarantined == 1
    assert [r["nonce"] for r in read_jsonl(path)] == [1, 0]
    quarantine = path.with_name(path.name + ".quarantine")
    [record] = [orjson.loads(line) for line in quarantine.read_bytes().splitlines()]
    assert record["offset"] == len(good) and record["length"] == len(fragment)
    assert record["text"] == fragment.decode()


def test_a_file_that_is_one_torn_line_is_quarantined_whole(tmp_path: Path) -> None:
    path = lake_file_path(tmp_path, "ticker24h", T0)
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"recv_ts":1,"mark\xc3')  # torn inside a UTF-8 sequence too
    tail = recover_torn_tail(path)
    assert tail == TornTail(path, 0, b'{"recv_ts":1,"mark\xc3')
    assert path.read_bytes() == b""
    record = orjson.loads(path.with_name(path.name + ".quarantine").read_bytes())
    assert record["base64"] == "eyJyZWN2X3RzIjoxLCJtYXJrww=="
    assert recover_torn_tail(path) is None


def test_recovering_a_file_a_writer_holds_is_refused(tmp_path: Path) -> None:
    with LakeWriter(tmp_path, "ticker24h") as writer:
        writer.write_batch(_rows(1))
        with pytest.raises(LakeLockedError):
            recover_torn_tail(writer.path_for(T0))


def test_read_jsonl_reports_a_torn_tail_and_never_parses_it(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a":1}\n{"a":2}\n{"a":3}')
    rows: list[dict[str, object]] = []
    with pytest.raises(TornTailError, match="offset 16"):
        rows.extend(read_jsonl(path))
    assert rows == [{"a": 1}, {"a": 2}]
    tails: list[TornTail] = []
    assert list(read_jsonl(path, on_torn_tail=tails.append)) == [{"a": 1}, {"a": 2}]
    assert tails == [TornTail(path, 16, b'{"a":3}')]


@pytest.mark.parametrize("content", [b'{"a":1}\nnot json\n{"a":2}\n', b'[1,2]\n', b"\n"])
def test_read_jsonl_refuses_a_bad_complete_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    with pytest.raises(LakeFormatError, match=r"x\.jsonl:\d"):
        list(read_jsonl(path))


def test_disk_full_raises_a_clear_oserror(tmp_path: Path) -> None:
    # /dev/full fails every write with ENOSPC at the OS level, as a full disk does.
    path = lake_file_path(tmp_path, "ticker24h", T0)
    path.parent.mkdir(parents=True)
    path.symlink_to("/dev/full")
    with LakeWriter(tmp_path, "ticker24h") as writer:
        with pytest.raises(LakeWriteError) as caught:
            writer.write_batch(_rows(3))
        assert isinstance(caught.value, OSError)
        assert caught.value.errno == errno.ENOSPC
        assert "No space left on device" in str(caught.value) and str(path) in str(caught.value)
        assert "NOT recorded" in str(caught.value)
        with pytest.raises(LakeWriteError):  # it keeps failing, never goes quiet
            writer.write_batch(_rows(1))
    assert writer.stats.rows_written == 0


def test_an_unusable_lake_root_raises_a_clear_oserror(tmp_path: Path) -> None:
    root = tmp_path / "lake"
    root.write_text("a file where the lake directory should be")
    with LakeWriter(root, "ticker24h") as writer, pytest.raises(LakeWriteError, match="partition directory"):
        writer.write_batch(_rows(1))


def test_fsync_per_batch_when_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    with LakeWriter(tmp_path, "ticker24h", fsync=True) as writer:
        writer.write_batch(_rows(2))
        writer.write_batch(_rows(2))
    assert len(synced) == 2
    synced.clear()
    with LakeWriter(tmp_path, "ticker24h") as writer:
        writer.write_batch(_rows(2))
    assert synced == []


def test_a_closed_writer_refuses_to_write(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path, "ticker24h")
    writer.close()
    with pytest.raises(LakeWriteError, match="closed"):
        writer.write_batch(_rows(1))


def test_added_rows_reach_the_file_only_at_flush_in_order_and_placed_by_time(tmp_path: Path) -> None:
    with LakeWriter(tmp_path, "ticker24h") as writer:
        writer.add_row({"recv_ts": T0, "nonce": 1})
        writer.add_line(T0 + HOUR, b'{"recv_ts":%d,"nonce":2}\n' % (T0 + HOUR))
        writer.add_row({"recv_ts": T0, "bid": Decimal("1.50")})
        assert not writer.path_for(T0).exists()  # nothing written before flush()
        assert writer.flush() == 3
        assert writer.flush() == 0  # nothing added since
        writer.add_row({"recv_ts": T0, "nonce": 3})  # close() writes it: added rows are never dropped
    assert list(read_jsonl(writer.path_for(T0))) == [{"recv_ts": T0, "nonce": 1}, {"recv_ts": T0, "bid": "1.5"},
                                                     {"recv_ts": T0, "nonce": 3}]
    assert list(read_jsonl(writer.path_for(T0 + HOUR))) == [{"recv_ts": T0 + HOUR, "nonce": 2}]
    assert writer.stats.rows_written == 4 and writer.stats.batches_written == 2


def test_a_row_that_cannot_be_encoded_is_refused_when_added(tmp_path: Path) -> None:
    with LakeWriter(tmp_path, "events") as writer:
        writer.add_row({"ts": T0, "nonce": 1})
        with pytest.raises(LakeFormatError, match="serializable"):
            writer.add_row({"ts": T0, "x": object()})
        with pytest.raises(LakeFormatError, match="none of"):
            writer.add_row({"type": "no time"})
        assert writer.flush() == 1


def test_a_failed_flush_raises_and_does_not_write_the_batch_twice(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(fd: int, data: memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with LakeWriter(tmp_path, "ticker24h") as writer:
        writer.add_row({"recv_ts": T0, "nonce": 1})
        with monkeypatch.context() as patch:
            patch.setattr(os, "write", fail)
            with pytest.raises(LakeWriteError, match="NOT recorded"):
                writer.flush()
        writer.add_row({"recv_ts": T0, "nonce": 2})
        assert writer.flush() == 1
    assert [r["nonce"] for r in read_jsonl(writer.path_for(T0))] == [2]


def test_a_batch_that_fails_halfway_is_cut_back_so_no_torn_line_follows(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def write_half_then_fail(fd: int, data: memoryview) -> int:
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.EIO, "Input/output error")

    with LakeWriter(tmp_path, "ticker24h") as writer:
        writer.write_batch(_rows(2))
        monkeypatch.setattr(os, "write", write_half_then_fail)
        with pytest.raises(LakeWriteError, match="Input/output error"):
            writer.write_batch(_rows(4))
        monkeypatch.setattr(os, "write", real_write)
        writer.write_batch(_rows(1))
    assert [r["nonce"] for r in read_jsonl(writer.path_for(T0))] == [0, 1, 0]
