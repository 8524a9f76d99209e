"""Signal engine deployment: `signal-engine` (docs/signal-engine.md).

Runs the loop of `trading.signal_engine` until cancelled, or for `duration_s` seconds (bounded
segments, tests, demos). Thresholds default to the env (`SIGNAL_MAX_SPREAD_BPS`,
`SIGNAL_MIN_VOLATILITY_BPS`, `SIGNAL_WINDOW`, `STALE_BOOK_MS`); a parameter that is set wins.
The per-entry work happens without Prefect; the flow logs the start and the end summary.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger

from blocks.runtime import with_redis_user
from trading.config import Settings
from trading.redis_conn import redis_url
from trading.signal_engine import DEFAULT_METRICS_PORT, run_signal_engine
from trading.signals import DEFAULT_MAX_SAMPLE_GAP_MS, DEFAULT_MIN_INTERVAL_MS, SignalParams


@flow(name="signal-engine")
async def signal_engine(duration_s: float | None = None, metrics_port: int = DEFAULT_METRICS_PORT,
                        lease_wait_s: float = 0.0, strategy: str = "baseline",
                        max_spread_bps: float | str | None = None, min_volatility_bps: float | str | None = None,
                        window: int | None = None, min_interval_ms: int = DEFAULT_MIN_INTERVAL_MS,
                        max_book_age_ms: int | None = None, max_sample_gap_ms: int = DEFAULT_MAX_SAMPLE_GAP_MS,
                        markets: list[str] | None = None,
                        strategy_options: dict[str, str] | None = None) -> dict[str, Any]:
    """Book entries in, signals out: rolling spread/volatility per market and a pluggable strategy.

    Unset thresholds come from the environment.

    Args:
        duration_s: seconds this segment runs before it returns and the restart trigger starts the next;
            empty: until cancelled.
        metrics_port: port of this loop's Prometheus /metrics (on METRICS_HOST).
        lease_wait_s: seconds to wait for the Redis lease a previous run may still hold (up to its 15 s TTL);
            0: fail at once when another instance holds it.
        strategy: "baseline", or a custom strategy as "package.module:function".
        max_spread_bps: a market whose spread is wider (basis points) gets no signal; empty: SIGNAL_MAX_SPREAD_BPS.
        min_volatility_bps: a market calmer than this (basis points) gets no signal;
            empty: SIGNAL_MIN_VOLATILITY_BPS.
        window: book samples in each market's rolling window; empty: SIGNAL_WINDOW.
        min_interval_ms: at least this long between two signals of one market.
        max_book_age_ms: a book entry older than this is not evaluated; empty: STALE_BOOK_MS.
        max_sample_gap_ms: no sample of a market for longer than this restarts its window.
        markets: only these markets, e.g. ["BTC-EUR"]; empty: every market on `bitvavo:book`.
        strategy_options: free-form settings passed to a custom strategy.
    """
    logger = get_run_logger()
    # A bad variable fails the run here, naming it; Redis as this loop's user when make up saved it.
    settings = await with_redis_user(Settings.from_env(), "signal-engine")
    params = SignalParams.from_settings(settings, max_spread_bps=max_spread_bps,
                                        min_volatility_bps=min_volatility_bps, window=window,
                                        min_interval_ms=min_interval_ms, max_book_age_ms=max_book_age_ms,
                                        max_sample_gap_ms=max_sample_gap_ms, options=strategy_options)
    with redis_url(settings) as url:
        logger.info("signal engine starting: strategy %s, %s, into %s (duration %s, metrics port %d)", strategy,
                    params.describe(), settings.signal_stream,
                    "unbounded" if duration_s is None else f"{duration_s}s", metrics_port)
        summary = await run_signal_engine(settings, redis_url=url, duration_s=duration_s, metrics_port=metrics_port,
                                          lease_wait_s=lease_wait_s, strategy=strategy, params=params,
                                          markets=markets)
    logger.info("signal engine finished: %d entries evaluated, %d signals %s, outcomes %s, rejected %s, "
                "%d reclaimed, %d lake rows", summary.evaluated, summary.signals, summary.signals_by_side,
                summary.outcomes, summary.rejected, summary.reclaimed, summary.lake_rows)
    return asdict(summary)
