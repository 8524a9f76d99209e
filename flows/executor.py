"""Executor deployment (`executor`): intents from `orders:shadow` become paper or live orders.

`DRY_RUN=true` (the default) runs the paper venue: the shared matching engine against a mirror
of the live book, nothing sent to the exchange. `DRY_RUN=false` runs the live venue, which
still refuses every order unless the go-live gate is open. The loop itself is
`trading.execution.executor.run_executor`; see docs/executor.md.
"""

from __future__ import annotations

from dataclasses import asdict
from decimal import Decimal
from typing import Any

import redis.asyncio
from prefect import flow, get_run_logger

from blocks.runtime import load_settings
from trading.config import Settings
from trading.execution.executor import DEFAULT_MAX_INTENT_AGE_S, DEFAULT_METRICS_PORT, run_executor
from trading.execution.paper import DEFAULT_BALANCES, DEFAULT_FEES, PaperVenue
from trading.ingest.markets import select_markets
from trading.matching import FeeRates
from trading.orders import Venue
from trading.redis_conn import async_client, redis_url


async def _venue(settings: Settings, client: redis.asyncio.Redis, *, book_wait_s: float,
                 paper_balances: dict[str, Decimal] | None, paper_maker_fee: Decimal,
                 paper_taker_fee: Decimal) -> tuple[Venue, str]:
    if not settings.dry_run:
        from trading.execution.live import LiveVenue  # only live runs load the order-sending code

        described = "live venue (orders go to Bitvavo once the go-live gate is open)"
        return LiveVenue(client=client, settings=settings), described
    selection = await select_markets(settings, client)
    venue = PaperVenue.from_settings(settings, selection.markets, balances=paper_balances or DEFAULT_BALANCES,
                                     fees=FeeRates(maker=paper_maker_fee, taker=paper_taker_fee),
                                     book_wait_s=book_wait_s)
    return venue, f"paper venue, books of {', '.join(selection.markets)} (from {selection.source})"


@flow(name="executor")
async def executor(duration_s: float | None = None, metrics_port: int = DEFAULT_METRICS_PORT,
                   lease_wait_s: float = 0.0, poll_interval_s: float = 1.0,
                   max_intent_age_s: float = DEFAULT_MAX_INTENT_AGE_S, book_wait_s: float = 5.0,
                   paper_balances: dict[str, Decimal] | None = None,
                   paper_maker_fee: Decimal = DEFAULT_FEES.maker,
                   paper_taker_fee: Decimal = DEFAULT_FEES.taker) -> dict[str, Any]:
    """Execute intents: paper fills in dry-run (default), Bitvavo orders in live mode.

    Args:
        duration_s: seconds this segment runs before it returns and the restart trigger starts the next;
            empty: until cancelled.
        metrics_port: port of this loop's Prometheus /metrics (on METRICS_HOST).
        lease_wait_s: seconds to wait for the Redis lease a previous run may still hold (up to its 15 s TTL);
            0: fail at once when another instance holds it.
        poll_interval_s: seconds between polls of the venue for orders that fill later.
        max_intent_age_s: an intent older than this is refused (`intent_expired`), never sent.
        book_wait_s: paper only: seconds an intent for a market without a book yet waits for it.
        paper_balances: paper only: starting balances per symbol, e.g. {"EUR": "10000", "BTC": "0"};
            empty: the paper venue's defaults.
        paper_maker_fee: paper only: maker fee as a fraction (0.0015 = 0.15 %).
        paper_taker_fee: paper only: taker fee as a fraction (0.0025 = 0.25 %).
    """
    logger = get_run_logger()
    # env, with the credentials block over it (a bad variable fails here), Redis as the executor's user
    settings = await load_settings(redis_role="executor")
    with redis_url(settings) as url:
        client = async_client(url)
        try:
            venue, described = await _venue(settings, client, book_wait_s=book_wait_s,
                                            paper_balances=paper_balances, paper_maker_fee=paper_maker_fee,
                                            paper_taker_fee=paper_taker_fee)
            logger.info("executor starting: %s (duration %s, metrics port %d)", described,
                        "unbounded" if duration_s is None else f"{duration_s}s", metrics_port)
            summary = await run_executor(settings, redis_url=url, venue=venue, duration_s=duration_s,
                                         metrics_port=metrics_port, lease_wait_s=lease_wait_s,
                                         poll_interval_s=poll_interval_s, max_intent_age_s=max_intent_age_s)
        finally:
            await client.aclose()
    logger.info("executor finished (%s): %d intents, %d reports, %d fills, %d kill-switch blocks, refusals %s, "
                "%d dead-lettered, %d restart cancels", summary.mode, summary.intents, summary.reports,
                summary.fills, summary.kill_switch_blocks, summary.refusals, summary.dead_lettered,
                summary.restart_cancels)
    return asdict(summary)
