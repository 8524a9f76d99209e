"""The `trading-core` deployment: signals in, risk-checked intents out (docs/trading-core.md).

Runs the loop until cancelled, or for `duration_s` seconds (bounded segments restarted by the
deployment trigger). Every limit defaults to its env var (`MAX_*`, `STALE_BOOK_MS`, ...); a
parameter set in the UI or with `-p` overrides it for this run. The per-signal work happens in
`trading.trading_core` without Prefect; the flow logs the start and the end summary.
"""

from __future__ import annotations

from dataclasses import asdict
from decimal import Decimal
from typing import Any

from prefect import flow, get_run_logger

from blocks.runtime import with_redis_user
from trading.config import Settings
from trading.redis_conn import redis_url
from trading.risk import Limits
from trading.trading_core import DEFAULT_METRICS_PORT, DEFAULT_SLIPPAGE_BPS, run_trading_core


@flow(name="trading-core")
async def trading_core(duration_s: float | None = None, metrics_port: int = DEFAULT_METRICS_PORT,
                       lease_wait_s: float = 0.0, order_notional_eur: Decimal | None = None,
                       slippage_bps: Decimal = DEFAULT_SLIPPAGE_BPS,
                       max_notional_per_order_eur: Decimal | None = None,
                       max_exposure_per_market_eur: Decimal | None = None,
                       max_exposure_total_eur: Decimal | None = None, max_open_intents: int | None = None,
                       max_daily_loss_eur: Decimal | None = None, stale_book_ms: int | None = None,
                       market_cooldown_ms: int | None = None) -> dict[str, Any]:
    """Size each signal into a limit IOC intent and let it through only if every guard passes.

    Limits left empty use the environment variable named with each.

    Args:
        duration_s: seconds this segment runs before it returns and the restart trigger starts the next;
            empty: until cancelled.
        metrics_port: port of this loop's Prometheus /metrics (on METRICS_HOST).
        lease_wait_s: seconds to wait for the Redis lease a previous run may still hold (up to its 15 s TTL);
            0: fail at once when another instance holds it.
        order_notional_eur: size of each order in EUR; empty: ORDER_NOTIONAL_EUR.
        slippage_bps: the limit price is this far (basis points) beyond the mid plus half the spread.
        max_notional_per_order_eur: refuse an order above this EUR value; empty: MAX_NOTIONAL_PER_ORDER_EUR.
        max_exposure_per_market_eur: refuse an order that takes one market's exposure (position plus open
            intents) above this; empty: MAX_EXPOSURE_PER_MARKET_EUR.
        max_exposure_total_eur: the same over all markets together; empty: MAX_EXPOSURE_TOTAL_EUR.
        max_open_intents: refuse while this many intents are still open; empty: MAX_OPEN_INTENTS.
        max_daily_loss_eur: once today's realised loss is beyond this, only orders that reduce a position
            pass; empty: MAX_DAILY_LOSS_EUR.
        stale_book_ms: refuse when the market's book is older than this; empty: STALE_BOOK_MS.
        market_cooldown_ms: at least this long between two intents of one market (0: off);
            empty: MARKET_COOLDOWN_MS.
    """
    logger = get_run_logger()
    # A bad variable fails the run here, naming it; Redis as this loop's user when make up saved it.
    settings = await with_redis_user(Settings.from_env(), "trading-core")
    limits = Limits.from_settings(settings, {
        "max_notional_per_order": max_notional_per_order_eur, "max_exposure_per_market": max_exposure_per_market_eur,
        "max_exposure_total": max_exposure_total_eur, "max_open_intents": max_open_intents,
        "max_daily_loss": max_daily_loss_eur, "stale_book_ms": stale_book_ms,
        "market_cooldown_ms": market_cooldown_ms})
    with redis_url(settings) as url:
        logger.info("trading core starting: dry_run=%s, stream %s, duration %s, metrics port %d, limits %s",
                    settings.dry_run, settings.signal_stream,
                    "unbounded" if duration_s is None else f"{duration_s}s", metrics_port, limits.describe())
        summary = await run_trading_core(settings, redis_url=url, duration_s=duration_s, metrics_port=metrics_port,
                                         lease_wait_s=lease_wait_s, limits=limits, order_notional=order_notional_eur,
                                         slippage_bps=slippage_bps)
    logger.info("trading core finished: %d signals, %d intents, rejects %s, %d duplicates, %d dead-lettered "
                "(market rules: %s)", summary.signals, summary.intents, summary.rejects or "none",
                summary.duplicates, summary.dead_lettered, summary.market_rules)
    return asdict(summary)
