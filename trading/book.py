"""Local order book and its nonce synchronisation (spec §7.4).

`OrderBook` keeps price levels keyed by decimal value, so "75516.00" and "75516" are the same
level. Each side is a dict price -> size plus a SortedList of its prices (ascending): a size
change is one dict store, O(1); a new or removed price is O(log n) in the SortedList; the best
level is the SortedList's end, O(1).

`BookSync` is the pure state machine around it: buffer events until a snapshot arrives, drop
buffered events at or below the snapshot nonce, apply the rest in sequence, and declare a gap
on any `nonce != last + 1` (a skip, a duplicate, or a reset after an engine restart).

Book events are applied straight from the wire frame (`{"nonce", "bids", "asks", ...}` with
string prices/sizes), parsing and applying each level in one pass: this is the hottest loop of
the stack. A malformed level leaves the book unknown, so it is handled like a gap: the event is
rejected (`PayloadError`) and the book resyncs from a snapshot.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from typing import Any

from sortedcontainers import SortedList

from trading.exchange.models import (
    BookSnapshot,
    Level,
    PayloadError,
    cached_price,
    parse_level_decimal,
    parse_price,
)


class _Side:
    __slots__ = ("prices", "sizes")

    def __init__(self, levels: list[Level] | None = None) -> None:
        self.sizes: dict[Decimal, Decimal] = {p: s for p, s in levels or () if s}
        self.prices = SortedList(self.sizes)

    def apply_wire(self, raw: Any, name: str) -> None:
        """Apply [[price, size], ...] with absolute sizes; "0" deletes. Raises PayloadError."""
        if type(raw) is not list:
            raise PayloadError(f"{name} must be a list of [price, size]")
        sizes, prices, lookup = self.sizes, self.prices, cached_price
        for entry in raw:
            if type(entry) is not list or len(entry) != 2:
                raise PayloadError(f"{name} entries must be [price, size], got {entry!r}")
            price_text, size_text = entry
            price = lookup(price_text) if type(price_text) is str else None
            if price is None:
                price = parse_price(price_text, f"{name} price")
            if type(size_text) is str and size_text and "0" <= size_text[0] <= "9":
                try:
                    size = Decimal(size_text)
                except ArithmeticError:
                    size = parse_level_decimal(size_text, f"{name} size", allow_zero=True)
            else:
                size = parse_level_decimal(size_text, f"{name} size", allow_zero=True)
            if size:
                if price not in sizes:
                    prices.add(price)
                sizes[price] = size
            elif sizes.pop(price, None) is not None:
                prices.remove(price)


class OrderBook:
    __slots__ = ("_asks", "_bids", "market", "nonce")

    def __init__(self, market: str) -> None:
        self.market = market
        self.nonce = -1
        self._bids = _Side()
        self._asks = _Side()

    def load(self, snapshot: BookSnapshot) -> None:
        self._bids = _Side(snapshot.bids)
        self._asks = _Side(snapshot.asks)
        self.nonce = snapshot.nonce

    def apply_wire(self, frame: dict[str, Any]) -> None:
        """Apply a `book` event's levels and take its nonce (nonce order is BookSync's job).

        A side may be absent or null (no change); anything else that is not a list is refused,
        so an applied event's sides are always level lists or absent."""
        bids = frame.get("bids")
        if bids or (bids is not None and type(bids) is not list):
            self._bids.apply_wire(bids, "bids")
        asks = frame.get("asks")
        if asks or (asks is not None and type(asks) is not list):
            self._asks.apply_wire(asks, "asks")
        self.nonce = frame["nonce"]

    def best_bid(self) -> Level | None:
        side = self._bids
        if not side.prices:
            return None
        price: Decimal = side.prices[-1]
        return price, side.sizes[price]

    def best_ask(self) -> Level | None:
        side = self._asks
        if not side.prices:
            return None
        price: Decimal = side.prices[0]
        return price, side.sizes[price]

    def bids(self, depth: int | None = None) -> list[Level]:
        """Best first (descending)."""
        sizes = self._bids.sizes
        prices = self._bids.prices
        count = len(prices) if depth is None else min(depth, len(prices))
        return [(p, sizes[p]) for p in prices.islice(len(prices) - count, reverse=True)]

    def asks(self, depth: int | None = None) -> list[Level]:
        """Best first (ascending)."""
        sizes = self._asks.sizes
        return [(p, sizes[p]) for p in self._asks.prices.islice(0, depth)]

    def size_at(self, side: str, price: Decimal) -> Decimal:
        levels = self._bids if side == "buy" else self._asks
        return levels.sizes.get(price, Decimal(0))

    def is_crossed(self) -> bool:
        bid, ask = self.best_bid(), self.best_ask()
        return bid is not None and ask is not None and bid[0] >= ask[0]

    def depth_counts(self) -> tuple[int, int]:
        return len(self._bids.sizes), len(self._asks.sizes)


class SyncState(Enum):
    AWAITING_SNAPSHOT = "awaiting_snapshot"
    LIVE = "live"


class UpdateOutcome(Enum):
    APPLIED = "applied"
    BUFFERED = "buffered"
    GAP = "gap"           # the book is invalid now; fetch a snapshot (BookSync is buffering again)


@dataclass(frozen=True, slots=True)
class Gap:
    market: str
    expected_nonce: int
    received_nonce: int


class BookBufferOverflowError(RuntimeError):
    """No snapshot arrived while the buffer filled up: the snapshot source is broken."""


class BookSync:
    """Snapshot + buffered deltas by nonce, resync on any gap or malformed event."""

    def __init__(self, market: str, max_buffer: int = 50_000) -> None:
        self.book = OrderBook(market)
        self.state = SyncState.AWAITING_SNAPSHOT
        self.resyncs = 0
        self.gaps = 0
        self.malformed = 0
        self.last_gap: Gap | None = None
        self._buffer: deque[dict[str, Any]] = deque()
        self._max_buffer = max_buffer

    @property
    def market(self) -> str:
        return self.book.market

    @property
    def is_live(self) -> bool:
        return self.state is SyncState.LIVE

    def on_update(self, frame: dict[str, Any]) -> UpdateOutcome:
        """Feed one `book` event for this market. Raises PayloadError (and resyncs) if malformed."""
        nonce = frame.get("nonce")
        if type(nonce) is not int:
            raise PayloadError(f"book event: nonce must be an integer, got {nonce!r}")
        if self.state is SyncState.AWAITING_SNAPSHOT:
            if len(self._buffer) >= self._max_buffer:
                raise BookBufferOverflowError(f"{self.market}: {self._max_buffer} events buffered, no snapshot")
            self._buffer.append(frame)
            return UpdateOutcome.BUFFERED
        expected = self.book.nonce + 1
        if nonce != expected:
            self._declare_gap(expected, nonce)
            self._buffer.append(frame)
            return UpdateOutcome.GAP
        try:
            self.book.apply_wire(frame)
        except PayloadError:
            self.malformed += 1
            self._declare_gap(expected, nonce)
            raise
        return UpdateOutcome.APPLIED

    def on_snapshot(self, snapshot: BookSnapshot,
                    on_replayed: Callable[[dict[str, Any]], None] | None = None) -> bool:
        """Load a snapshot and replay buffered events after it. True when the book is live.

        `on_replayed(frame)` is called after each buffered event is applied, with the book in the
        state that event produced (so a recorder can emit it exactly as a live update).

        False means the buffered events do not continue the snapshot (the snapshot is older
        than the first buffered event, the buffer has a hole, or a buffered event is
        malformed): fetch another one.
        """
        self.book.load(snapshot)
        pending = [f for f in self._buffer if f["nonce"] > snapshot.nonce]
        self._buffer.clear()
        expected = snapshot.nonce + 1
        for position, frame in enumerate(pending):
            if frame["nonce"] != expected:
                # Keep what follows the hole; the next snapshot will cover it.
                self._buffer.extend(pending[position:])
                self.state = SyncState.AWAITING_SNAPSHOT
                return False
            try:
                self.book.apply_wire(frame)
            except PayloadError:
                self.malformed += 1
                self._buffer.extend(pending[position + 1:])
                self.state = SyncState.AWAITING_SNAPSHOT
                return False
            if on_replayed is not None:
                on_replayed(frame)
            expected += 1
        self.state = SyncState.LIVE
        return True

    def reset(self) -> None:
        """Forget the book (after a reconnect): buffer from now on until the next snapshot."""
        self.state = SyncState.AWAITING_SNAPSHOT
        self._buffer.clear()

    def _declare_gap(self, expected: int, received: int) -> None:
        self.gaps += 1
        self.resyncs += 1
        self.last_gap = Gap(self.market, expected, received)
        self.state = SyncState.AWAITING_SNAPSHOT
        self._buffer.clear()
