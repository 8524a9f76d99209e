"""The two rows of each applied book update, encoded once, straight into their lake and stream forms.

Every applied update gives an `orderbook/update` row (market, nonce, bids, asks as received) and
an `orderbook/top` row (the top of book after it); each goes to the lake as a JSON line and to
its stream as an entry. At tens of thousands of updates a second, building each row as a dict
and encoding it twice (lake, then stream) was most of the ingest's cost, so the two forms are
built here in one step each: the level lists are dumped by orjson once and shared by the lake
line and the stream entry, and the top-of-book fields are encoded once per change of the top.

The bytes are exactly what `LakeWriter.add_row` and `trading.bus.encoded_entry` make of the
same row (`tests/unit/test_book_rows.py` holds them to it), so readers see no difference.
"""

from __future__ import annotations

from typing import Any

import orjson

from trading.bus import SCHEMA_VERSION
from trading.decimals import format_decimal
from trading.exchange.models import Level

_UPDATE_LINE = b'{"v":%d,"ts":%d,"recv_ts":%d,"market":%b,"nonce":%d,"bids":%b,"asks":%b}\n'
_UPDATE_ENTRY = b'["v","%d","ts","%d","recv_ts","%d","market",%b,"nonce","%d","bids","%b","asks","%b"]'
_TOP_LINE = b'{"v":%d,"ts":%d,"recv_ts":%d,"market":%b,"nonce":%d%b}\n'
_TOP_ENTRY = b'["v","%d","ts","%d","recv_ts","%d","market",%b,"nonce","%d"%b]'


def _in_string(json_text: bytes) -> bytes:
    """JSON text escaped for the inside of a JSON string. orjson never emits a raw control
    character, so quotes and backslashes are all that need escaping."""
    return json_text.replace(b"\\", b"\\\\").replace(b'"', b'\\"')


class BookRowEncoder:
    """Encodes the rows of one market's applied updates: `(lake line, stream entry)` pairs."""

    __slots__ = ("_market", "_top", "_top_entry", "_top_line")

    def __init__(self, market: str) -> None:
        self._market = orjson.dumps(market)
        self._top: tuple[Level | None, Level | None] | None = None
        self._top_line = self._top_entry = b""

    def update(self, ts: int, recv_ts: int, nonce: int, bids: list[Any], asks: list[Any]) -> tuple[bytes, bytes]:
        """The `orderbook/update` row; `bids`/`asks` are the event's level lists as decoded."""
        bids_json, asks_json = orjson.dumps(bids), orjson.dumps(asks)
        market = self._market
        return (_UPDATE_LINE % (SCHEMA_VERSION, ts, recv_ts, market, nonce, bids_json, asks_json),
                _UPDATE_ENTRY % (SCHEMA_VERSION, ts, recv_ts, market, nonce, _in_string(bids_json),
                                 _in_string(asks_json)))

    def top(self, ts: int, recv_ts: int, nonce: int, bid: Level | None, ask: Level | None) -> tuple[bytes, bytes]:
        """The `orderbook/top` row: bid/bid_size and ask/ask_size, each pair only when that side has a level."""
        if self._top is None or self._top[0] != bid or self._top[1] != ask:
            self._encode_top(bid, ask)
        market = self._market
        return (_TOP_LINE % (SCHEMA_VERSION, ts, recv_ts, market, nonce, self._top_line),
                _TOP_ENTRY % (SCHEMA_VERSION, ts, recv_ts, market, nonce, self._top_entry))

    def _encode_top(self, bid: Level | None, ask: Level | None) -> None:
        fields: list[tuple[bytes, bytes]] = []
        for (price_name, size_name), level in (((b'"bid"', b'"bid_size"'), bid), ((b'"ask"', b'"ask_size"'), ask)):
            if level is not None:
                fields += [(price_name, orjson.dumps(format_decimal(level[0]))),
                           (size_name, orjson.dumps(format_decimal(level[1])))]
        self._top = (bid, ask)
        self._top_line = b"".join(b",%b:%b" % field for field in fields)
        self._top_entry = b"".join(b",%b,%b" % field for field in fields)
