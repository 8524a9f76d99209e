"""The clock that drives the generators: `rate` steps per second per market, and ticker24h each second
(both stop while the feed is paused).

Steps are counted, not timed: falling behind skips ahead instead of bursting, so the book a
client sees depends on the seed and the number of steps, never on scheduling jitter.
"""

from __future__ import annotations

import asyncio

from trading.sim.exchange import SimExchange

_MAX_LAG_S = 1.0


class FeedLoop:
    def __init__(self, exchange: SimExchange, rate: float) -> None:
        self.exchange = exchange
        self.rate = rate

    async def run_book(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += 1.0 / self.rate
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                if delay < -_MAX_LAG_S:
                    next_at = loop.time()
                await asyncio.sleep(0)  # let requests in between steps
            if not self.exchange.faults.feed_paused:
                self.exchange.step_all()

    async def run_ticker24h(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if not self.exchange.faults.feed_paused:
                self.exchange.publish_ticker24h()
