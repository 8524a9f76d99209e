"""The order book rows' fast encodings are byte for byte what the lake writer and the stream codec make."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from trading.bus import BOOK_SCHEMA, ORDERBOOK_UPDATE_SCHEMA, decode_entry, encoded_entry
from trading.decimals import format_decimal
from trading.exchange.models import Level
from trading.ingest.book_rows import BookRowEncoder
from trading.lake import LakeWriter

T0 = 1_758_600_000_000
D = Decimal

# Level strings as the book accepts them (a leading digit, then anything Decimal() parses),
# including the odd ones, so the escaping is exercised beyond plain digits.
_number = st.one_of(st.decimals(min_value=0, max_value=10**9, allow_nan=False, places=8).map(str),
                    st.sampled_from(["1e5", "1E-3", "1_000", "7 ", "3\t", "0.000", "2\u0663"]))
_levels = st.lists(st.lists(_number, min_size=2, max_size=2), max_size=4)


def _lake_line(tmp_path: Path, row: dict[str, Any]) -> bytes:
    """The line `LakeWriter` writes for `row`."""
    with LakeWriter(tmp_path, "x") as writer:
        writer.add_row(row)
        writer.flush()
        path = writer.path_for(row["recv_ts"])
    line = path.read_bytes()
    path.unlink()
    return line


def _update_row(ts: int, nonce: int, bids: list[Any], asks: list[Any], market: str) -> dict[str, Any]:
    return {"v": 1, "ts": ts, "recv_ts": ts + 3, "market": market, "nonce": nonce, "bids": bids, "asks": asks}


@settings(max_examples=60, deadline=None)
@given(bids=_levels, asks=_levels, nonce=st.integers(0, 2**63), market=st.sampled_from(["BTC-EUR", 'Q"\\-EUR']))
def test_update_row_matches_the_generic_encodings(tmp_path_factory: Any, bids: list[Any], asks: list[Any],
                                                  nonce: int, market: str) -> None:
    line, entry = BookRowEncoder(market).update(T0, T0 + 3, nonce, bids, asks)
    row = _update_row(T0, nonce, bids, asks, market)
    assert line == _lake_line(tmp_path_factory.mktemp("lake"), row)
    assert entry == encoded_entry(row)
    fields = dict(zip(*[iter(orjson.loads(entry))] * 2, strict=True))
    assert decode_entry(fields, ORDERBOOK_UPDATE_SCHEMA)["bids"] == bids


def _top_row(nonce: int, bid: Level | None, ask: Level | None) -> dict[str, Any]:
    """The row as the handler used to build it: contract decimal strings, a side only when it has a level."""
    row: dict[str, Any] = {"v": 1, "ts": T0, "recv_ts": T0 + 3, "market": "BTC-EUR", "nonce": nonce}
    if bid is not None:
        row |= {"bid": format_decimal(bid[0]), "bid_size": format_decimal(bid[1])}
    if ask is not None:
        row |= {"ask": format_decimal(ask[0]), "ask_size": format_decimal(ask[1])}
    return row


def test_top_row_matches_the_generic_encodings_as_the_top_changes_and_comes_back(tmp_path: Path) -> None:
    encoder = BookRowEncoder("BTC-EUR")
    tops: list[tuple[Level | None, Level | None]] = [
        ((D("75516.10"), D("0.5")), (D(75517), D("1.25"))),
        ((D("75516.10"), D("0.5")), (D(75517), D("1.25"))),   # unchanged: reused
        ((D("75516.10"), D("0.4")), (D(75517), D("1.25"))),   # a bid size changed
        ((D("75516.10"), D("0.4")), (D(75518), D("1.25"))),   # only the ask changed
        (None, (D(75517), D("1.25"))),                        # empty bid side
        ((D("75516.10"), D("0.5")), None),
        (None, None),
        ((D("75516.10"), D("0.5")), (D(75517), D("1.25"))),   # back to the first
    ]
    for nonce, (bid, ask) in enumerate(tops):
        line, entry = encoder.top(T0, T0 + 3, nonce, bid, ask)
        row = _top_row(nonce, bid, ask)
        assert line == _lake_line(tmp_path, row), nonce
        assert entry == encoded_entry(row), nonce
        fields = dict(zip(*[iter(orjson.loads(entry))] * 2, strict=True))
        decoded = decode_entry(fields, BOOK_SCHEMA)
        assert (decoded.get("bid"), decoded.get("ask_size")) == (bid and bid[0], ask and ask[1])
