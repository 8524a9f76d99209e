"""Local order book and its nonce synchronisation (spec §7.4).

`OrderBook` keeps price levels keyed by decimal value, so "75516.00" and "75516" are the same
level. Each side is a SortedDict (ascending); a level update is O(log n) when the price is new
or removed and O(1) when only the size changes; the best level is the SortedDict's end, O(1).

`BookSync` is the pure state machine around it: buffer events until a snapshot arrives, drop
buffered events at or below the snapshot nonce, apply the rest in sequence, and declare a gap
on any `nonce != last + 1` (a skip, a duplicate, or a reset after an engine restart).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum

from sortedcontainers import SortedDict

from trading.exchange.models import BookSnapshot, BookUpdate, Level


class OrderBook:
    __slots__ = ("_asks", "_bids", "market", "nonce")

    def __init__(self, market: str) -> None:
        self.market = market
        self.nonce = -1
        self._bids: SortedDict = SortedDict()
        self._asks: SortedDict = SortedDict()

    def load(self, snapshot: BookSnapshot) -> None:
        self._bids = SortedDict((p, s) for p, s in snapshot.bids if s)
        self._asks = SortedDict((p, s) for p, s in snapshot.asks if s)
        self.nonce = snapshot.nonce

    def apply(self, update: BookUpdate) -> None:
        """Apply absolute level sizes; size 0 removes the level. Nonce order is BookSync's job."""
        _apply_side(self._bids, update.bids)
        _apply_side(self._asks, update.asks)
        self.nonce = update.nonce

    def best_bid(self) -> Level | None:
        if not self._bids:
            return None
        price, size = self._bids.peekitem(-1)
        return price, size

    def best_ask(self) -> Level | None:
        if not self._asks:
            return None
        price, size = self._asks.peekitem(0)
        return price, size

    def bids(self, depth: int | None = None) -> list[Level]:
        """Best first (descending)."""
        items = self._bids.items()
        count = len(items) if depth is None else min(depth, len(items))
        return [items[-1 - i] for i in range(count)]

    def asks(self, depth: int | None = None) -> list[Level]:
        """Best first (ascending)."""
        items = self._asks.items()
        count = len(items) if depth is None else min(depth, len(items))
        return [items[i] for i in range(count)]

    def size_at(self, side: str, price: Decimal) -> Decimal:
        levels = self._bids if side == "buy" else self._asks
        size: Decimal = levels.get(price, Decimal(0))
        return size

    def is_crossed(self) -> bool:
        bid, ask = self.best_bid(), self.best_ask()
        return bid is not None and ask is not None and bid[0] >= ask[0]

    def depth_counts(self) -> tuple[int, int]:
        return len(self._bids), len(self._asks)


def _apply_side(levels: SortedDict, changes: list[Level]) -> None:
    for price, size in changes:
        if size:
            levels[price] = size
        else:
            levels.pop(price, None)


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
    """Snapshot + buffered deltas by nonce, resync on any gap."""

    def __init__(self, market: str, max_buffer: int = 50_000) -> None:
        self.book = OrderBook(market)
        self.state = SyncState.AWAITING_SNAPSHOT
        self.resyncs = 0
        self.gaps = 0
        self.last_gap: Gap | None = None
        self._buffer: deque[BookUpdate] = deque()
        self._max_buffer = max_buffer

    @property
    def market(self) -> str:
        return self.book.market

    @property
    def is_live(self) -> bool:
        return self.state is SyncState.LIVE

    def on_update(self, update: BookUpdate) -> UpdateOutcome:
        if self.state is SyncState.AWAITING_SNAPSHOT:
            if len(self._buffer) >= self._max_buffer:
                raise BookBufferOverflowError(f"{self.market}: {self._max_buffer} events buffered, no snapshot")
            self._buffer.append(update)
            return UpdateOutcome.BUFFERED
        expected = self.book.nonce + 1
        if update.nonce != expected:
            self._declare_gap(expected, update)
            return UpdateOutcome.GAP
        self.book.apply(update)
        return UpdateOutcome.APPLIED

    def on_snapshot(self, snapshot: BookSnapshot) -> bool:
        """Load a snapshot and replay buffered events after it. True when the book is live.

        False means the buffered events do not continue the snapshot (the snapshot is older
        than the first buffered event, or the buffer itself has a hole): fetch another one.
        """
        self.book.load(snapshot)
        pending = [u for u in self._buffer if u.nonce > snapshot.nonce]
        self._buffer.clear()
        expected = snapshot.nonce + 1
        for position, update in enumerate(pending):
            if update.nonce != expected:
                # Keep what follows the hole; the next snapshot will cover it.
                self._buffer.extend(pending[position:])
                self.state = SyncState.AWAITING_SNAPSHOT
                return False
            self.book.apply(update)
            expected += 1
        self.state = SyncState.LIVE
        return True

    def reset(self) -> None:
        """Forget the book (after a reconnect): buffer from now on until the next snapshot."""
        self.state = SyncState.AWAITING_SNAPSHOT
        self._buffer.clear()

    def _declare_gap(self, expected: int, update: BookUpdate) -> None:
        self.gaps += 1
        self.resyncs += 1
        self.last_gap = Gap(self.market, expected, update.nonce)
        self.state = SyncState.AWAITING_SNAPSHOT
        self._buffer.clear()
        self._buffer.append(update)
