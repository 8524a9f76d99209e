"""Which markets an ingest loop records: `INGEST_MARKETS`, else the universe hash, else the default.

The universe (`trading:universe`, written by universe selection) can change while a loop runs;
`UniverseWatcher.poll()` returns what was added and removed since the last poll so the loop
can subscribe and unsubscribe without a restart. A malformed market name in the hash is
skipped and reported, never subscribed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis.asyncio

from trading.bus import KEY_UNIVERSE
from trading.config import DEFAULT_MARKETS, MARKET_PATTERN, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MarketSelection:
    markets: tuple[str, ...]
    source: str  # "INGEST_MARKETS" | "trading:universe" | "default"
    rejected: tuple[str, ...] = ()


async def read_universe(client: redis.asyncio.Redis) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(valid markets sorted, rejected names) from the universe hash."""
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in await client.hkeys(KEY_UNIVERSE)]
    valid = tuple(sorted(n for n in names if MARKET_PATTERN.match(n)))
    rejected = tuple(sorted(n for n in names if not MARKET_PATTERN.match(n)))
    if rejected:
        log.warning("ignoring malformed market names in %s: %s", KEY_UNIVERSE, ", ".join(rejected))
    return valid, rejected


async def select_markets(settings: Settings, client: redis.asyncio.Redis) -> MarketSelection:
    if settings.ingest_markets:
        return MarketSelection(settings.ingest_markets, "INGEST_MARKETS")
    universe, rejected = await read_universe(client)
    if universe:
        return MarketSelection(universe, KEY_UNIVERSE, rejected)
    return MarketSelection(DEFAULT_MARKETS, "default", rejected)


@dataclass(frozen=True)
class UniverseChange:
    added: tuple[str, ...]
    removed: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


class UniverseWatcher:
    """Tracks the selected markets; `poll()` reports changes (none while INGEST_MARKETS pins them)."""

    def __init__(self, settings: Settings, client: redis.asyncio.Redis, current: MarketSelection) -> None:
        self._settings = settings
        self._client = client
        self.current = current

    async def poll(self) -> UniverseChange:
        if self._settings.ingest_markets:
            return UniverseChange((), ())
        selection = await select_markets(self._settings, self._client)
        before, after = set(self.current.markets), set(selection.markets)
        self.current = selection
        return UniverseChange(tuple(sorted(after - before)), tuple(sorted(before - after)))
