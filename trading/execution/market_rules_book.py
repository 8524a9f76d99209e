"""The market rules (GET /markets) a venue loaded at start, shared with the executor's own checks.

A venue builds one `MarketRulesBook` over its own REST client and loads it in `start()`; the
executor reads the same book (`Venue.market_rules`), so GET /markets is fetched once per start.
`lookup(market)` reads it again when asked about a market it does not list or lists as not
trading (a market listed or reopened since the start), at most once every `refresh_s`: a burst of
intents for an unlisted market costs one call per interval, not one per intent. A failed refresh
keeps the rules it had.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from trading.matching import MarketRules

log = logging.getLogger(__name__)

TRADING = "trading"
DEFAULT_REFRESH_S = 60.0


class MarketRulesBook:
    def __init__(self, fetch: Callable[[], Sequence[MarketRules]], *, refresh_s: float = DEFAULT_REFRESH_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`fetch` is blocking (a REST call); it runs off the event loop."""
        if refresh_s <= 0:
            raise ValueError("refresh_s must be positive")
        self._fetch = fetch
        self._refresh_s = refresh_s
        self._clock = clock
        self._rules: dict[str, MarketRules] = {}
        self._attempted_at: float | None = None
        self._loaded = False
        self.refreshes = 0

    @property
    def loaded(self) -> bool:
        """True once a load succeeded."""
        return self._loaded

    async def load(self) -> list[MarketRules]:
        """Read the rules now (the venue's start); a failure is the caller's, and the rules loaded before stay."""
        self._attempted_at = self._clock()  # counted from the attempt: a failing exchange is not asked per intent
        rules = list(await asyncio.to_thread(self._fetch))
        self._rules = {rule.market: rule for rule in rules}
        self._loaded = True
        return rules

    async def refresh(self) -> None:
        """Read the rules again unless the last attempt is younger than `refresh_s`; a failure is logged."""
        if self._attempted_at is not None and self._clock() - self._attempted_at < self._refresh_s:
            return
        self.refreshes += 1
        try:
            await self.load()
        except Exception as exc:  # whatever the fetch raised (exchange, payload): keep what we had
            log.warning("market rules: GET /markets failed, keeping the rules loaded before: %s: %s",
                        type(exc).__name__, exc)

    def get(self, market: str) -> MarketRules | None:
        """The rules as loaded, without asking the exchange."""
        return self._rules.get(market)

    async def lookup(self, market: str) -> MarketRules | None:
        """The market's rules, read again (bounded) when it is not listed or not trading."""
        rules = self._rules.get(market)
        if rules is None or rules.status != TRADING:
            await self.refresh()
            rules = self._rules.get(market)
        return rules
