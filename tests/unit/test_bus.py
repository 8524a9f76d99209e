from decimal import Decimal
from enum import IntEnum, StrEnum

import pytest

from trading.bus import (
    BOOK_SCHEMA,
    CANDLE_SCHEMA,
    ORDERBOOK_UPDATE_SCHEMA,
    STREAM_BOOK,
    STREAM_ORDERBOOK_UPDATE,
    STREAM_TICKER24H,
    TICKER24H_SCHEMA,
    EntryDecodeError,
    EntryEncodeError,
    FieldKind,
    dead_letter_stream,
    decode_entry,
    encode_entry,
    stream_candles,
)


class Side(StrEnum):
    BUY = "buy"


class Level(IntEnum):
    HIGH = 3


def test_stream_names_follow_the_checklist() -> None:
    assert STREAM_TICKER24H == "bitvavo:ticker24h"
    assert STREAM_BOOK == "bitvavo:book"
    assert STREAM_ORDERBOOK_UPDATE == "bitvavo:orderbook:update"
    assert stream_candles("1m") == "bitvavo:candles:1m"
    assert dead_letter_stream("orders:shadow") == "orders:shadow:dead"


def test_encode_turns_every_type_into_its_contract_string() -> None:
    entry = encode_entry({
        "ts": 1758600000000, "market": "BTC-EUR", "bid": Decimal("75516.00"), "size": Decimal("1E-8"),
        "dry_run": True, "live": False, "bids": [["75516.00", "0.1"], [Decimal("75515.5"), Decimal("2")]],
        "detail": {"reason": "gap", "n": 3}, "side": Side.BUY, "level": Level.HIGH, "price": None,
    })
    assert entry == {
        "v": "1", "ts": "1758600000000", "market": "BTC-EUR", "bid": "75516", "size": "0.00000001",
        "dry_run": "true", "live": "false", "bids": '[["75516.00","0.1"],["75515.5","2"]]',
        "detail": '{"reason":"gap","n":3}', "side": "buy", "level": "3",
    }
    assert next(iter(entry)) == "v"


def test_encode_sets_the_schema_version() -> None:
    assert encode_entry({"ts": 1}, v=2)["v"] == "2"


@pytest.mark.parametrize("fields", [
    {"ts": 1, "price": 1.5},
    {"ts": 1, "price": Decimal("NaN")},
    {"ts": 1, "at": object()},
    {"ts": 1, "levels": [object()]},
    {"ts": 1, "v": "1"},
    {"market": "BTC-EUR"},
])
def test_encode_refuses_what_the_contract_cannot_carry(fields: dict[str, object]) -> None:
    with pytest.raises(EntryEncodeError):
        encode_entry(fields)


def test_decode_restores_types_by_schema() -> None:
    raw = encode_entry({"ts": 10, "recv_ts": 12, "market": "BTC-EUR", "nonce": 42, "bid": Decimal("1.5"),
                        "bid_size": "2", "ask": "1.6", "ask_size": "0.25", "extra": "x"})
    decoded = decode_entry(raw, BOOK_SCHEMA)
    assert decoded == {"v": 1, "ts": 10, "recv_ts": 12, "market": "BTC-EUR", "nonce": 42,
                       "bid": Decimal("1.5"), "bid_size": Decimal(2), "ask": Decimal("1.6"),
                       "ask_size": Decimal("0.25"), "extra": "x"}


def test_decode_accepts_bytes_as_redis_returns_without_decode_responses() -> None:
    raw = {b"v": b"1", b"ts": b"5", b"market": b"ETH-EUR", b"nonce": b"7", b"bids": b'[["1","2"]]', b"asks": b"[]"}
    assert decode_entry(raw, ORDERBOOK_UPDATE_SCHEMA) == {
        "v": 1, "ts": 5, "market": "ETH-EUR", "nonce": 7, "bids": [["1", "2"]], "asks": []}


def test_decode_leaves_omitted_fields_absent() -> None:
    decoded = decode_entry(encode_entry({"ts": 1, "market": "X-EUR", "open": None, "last": "2"}), TICKER24H_SCHEMA)
    assert "open" not in decoded
    assert decoded["last"] == Decimal(2)


def test_decode_bool_kind() -> None:
    schema = {"dry_run": FieldKind.BOOL}
    assert decode_entry({"v": "1", "ts": "1", "dry_run": "true"}, schema)["dry_run"] is True
    assert decode_entry({"v": "1", "ts": "1", "dry_run": "false"}, schema)["dry_run"] is False
    with pytest.raises(EntryDecodeError, match="dry_run"):
        decode_entry({"v": "1", "ts": "1", "dry_run": "1"}, schema)


@pytest.mark.parametrize(("raw", "field"), [
    ({"v": "1", "ts": "1", "open": "abc"}, "open"),
    ({"v": "1", "ts": "1", "open": "Infinity"}, "open"),
    ({"v": "1", "ts": "1", "open_ts": "1.5"}, "open_ts"),
    ({"v": "1", "ts": "soon"}, "ts"),
])
def test_decode_names_the_bad_field(raw: dict[str, str], field: str) -> None:
    with pytest.raises(EntryDecodeError, match=field):
        decode_entry(raw, CANDLE_SCHEMA)


def test_decode_refuses_missing_envelope_and_newer_versions() -> None:
    with pytest.raises(EntryDecodeError, match="lacks"):
        decode_entry({"v": "1", "market": "BTC-EUR"})
    with pytest.raises(EntryDecodeError, match="version 2"):
        decode_entry({"v": "2", "ts": "1"})
    assert decode_entry({"v": "2", "ts": "1"}, max_version=2)["v"] == 2


def test_bad_json_field_is_reported() -> None:
    with pytest.raises(EntryDecodeError, match="bids"):
        decode_entry({"v": "1", "ts": "1", "bids": "[[1,"}, ORDERBOOK_UPDATE_SCHEMA)


def test_a_row_carrying_its_own_schema_version_keeps_it() -> None:
    # One dict feeds the lake and the stream: its `v` wins over the default.
    assert encode_entry({"v": 3, "ts": 1, "market": "BTC-EUR"}) == {"v": "3", "ts": "1", "market": "BTC-EUR"}
