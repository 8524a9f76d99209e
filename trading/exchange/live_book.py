"""Local order books kept in sync over a `BitvavoWebSocket` (spec §7.4).

Book events are fed in by `on_book_event` (called from the socket's event handler). The first
event buffered while a market has no valid book triggers a `getBook` snapshot over the same
socket; `BookSync` replays the buffer and declares gaps. Every gap is reported to `on_gap`
and healed by a new snapshot. A dropped socket invalidates every book at once (`reset_all`,
wired as the socket's `on_disconnect` hook): nobody may read a frozen book as live while the
exchange is unreachable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trading.backoff import Backoff
from trading.book import BookBufferOverflowError, BookSync, Gap, UpdateOutcome
from trading.clock import now_ms
from trading.exchange.errors import BitvavoError, RateLimitBannedError
from trading.exchange.models import BookSnapshot, Level, PayloadError
from trading.exchange.ws import BitvavoWebSocket
from trading.log_sampling import worth_logging

log = logging.getLogger(__name__)


@dataclass
class LiveBookStats:
    applied: int = 0
    parse_errors: int = 0
    unknown_market: int = 0
    snapshots: int = 0
    stale_snapshots: int = 0
    snapshot_failures: int = 0


# (sync, frame, best bid, best ask after the frame)
AppliedHandler = Callable[[BookSync, dict[str, Any], Level | None, Level | None], None]


def _recorder(sync: BookSync, into: list[tuple[dict[str, Any], Level | None, Level | None]]
              ) -> Callable[[dict[str, Any]], None]:
    """Remembers each replayed frame with the top of book it produced."""
    def record(frame: dict[str, Any]) -> None:
        into.append((frame, sync.book.best_bid(), sync.book.best_ask()))
    return record


class LiveBooks:
    def __init__(self, markets: list[str], *, on_applied: AppliedHandler | None = None,
                 on_gap: Callable[[Gap], None] | None = None,
                 on_snapshot: Callable[[BookSync, BookSnapshot], None] | None = None) -> None:
        self.syncs: dict[str, BookSync] = {m: BookSync(m) for m in markets}
        self.stats = LiveBookStats()
        self._on_applied = on_applied
        self._on_gap = on_gap
        self._on_snapshot = on_snapshot
        self._ws: BitvavoWebSocket | None = None
        self._fetching: dict[str, asyncio.Task[None]] = {}

    def attach(self, ws: BitvavoWebSocket) -> None:
        self._ws = ws

    @property
    def resyncs(self) -> int:
        return sum(s.resyncs for s in self.syncs.values())

    def add_market(self, market: str) -> None:
        self.syncs.setdefault(market, BookSync(market))

    def remove_market(self, market: str) -> None:
        self.syncs.pop(market, None)
        task = self._fetching.pop(market, None)
        if task is not None:
            task.cancel()

    def reset_all(self) -> None:
        for sync in self.syncs.values():
            sync.reset()
        for task in self._fetching.values():
            task.cancel()
        self._fetching.clear()

    def on_book_event(self, frame: dict[str, Any]) -> None:
        sync = self.syncs.get(frame.get("market"))  # type: ignore[arg-type]
        if sync is None:
            self.stats.unknown_market += 1
            return
        try:
            outcome = sync.on_update(frame)
        except PayloadError as exc:
            self.stats.parse_errors += 1
            if worth_logging(self.stats.parse_errors):
                log.warning("rejected book event on %s (book resyncs; %d rejected so far): %s", sync.market,
                            self.stats.parse_errors, exc)
            self._ensure_snapshot(sync.market)
            return
        except BookBufferOverflowError as exc:
            # No snapshot could be had for a long time: start buffering afresh, keep trying.
            log.error("%s", exc)
            sync.reset()
            self._ensure_snapshot(sync.market)
            return
        if outcome is UpdateOutcome.APPLIED:
            self.stats.applied += 1
            if self._on_applied is not None:
                self._on_applied(sync, frame, sync.book.best_bid(), sync.book.best_ask())
            return
        if outcome is UpdateOutcome.GAP and sync.last_gap is not None:
            log.info("book gap on %s: expected nonce %d, got %d; resyncing", sync.market,
                     sync.last_gap.expected_nonce, sync.last_gap.received_nonce)
            if self._on_gap is not None:
                self._on_gap(sync.last_gap)
        self._ensure_snapshot(sync.market)

    def _ensure_snapshot(self, market: str) -> None:
        if market in self._fetching or self._ws is None:
            return
        self._fetching[market] = asyncio.get_running_loop().create_task(self._fetch_snapshot(market))

    async def _fetch_snapshot(self, market: str) -> None:
        """Fetch snapshots until the market's book is live (or the market is dropped).

        Failures back off with jitter; a rate-limit ban waits for its end rather than asking again.
        """
        assert self._ws is not None
        backoff = Backoff(base_s=0.25, cap_s=10.0)
        try:
            while True:
                sync = self.syncs.get(market)
                if sync is None or sync.is_live:
                    return
                try:
                    snapshot = BookSnapshot.from_wire(await self._ws.request("getBook", market=market))
                except RateLimitBannedError as exc:
                    self.stats.snapshot_failures += 1
                    wait_s = max((exc.banned_until_ms or 0) - now_ms(), 1000) / 1000
                    log.error("getBook %s: rate-limit ban, next try in %.0fs", market, wait_s)
                    await asyncio.sleep(wait_s)
                    continue
                except (TimeoutError, BitvavoError, PayloadError, ConnectionError) as exc:
                    self.stats.snapshot_failures += 1
                    log.warning("getBook %s failed: %s", market, exc)
                    await asyncio.sleep(backoff.next_delay())
                    continue
                self.stats.snapshots += 1
                replayed: list[tuple[dict[str, Any], Level | None, Level | None]] = []
                if sync.on_snapshot(snapshot, _recorder(sync, replayed)):
                    # The snapshot first, then the buffered updates it was followed by: the
                    # record has no hole between the snapshot's nonce and the first live update.
                    if self._on_snapshot is not None:
                        self._on_snapshot(sync, snapshot)
                    self.stats.applied += len(replayed)
                    if self._on_applied is not None:
                        for frame, bid, ask in replayed:
                            self._on_applied(sync, frame, bid, ask)
                    return
                self.stats.stale_snapshots += 1
        finally:
            if self._fetching.get(market) is asyncio.current_task():
                del self._fetching[market]
