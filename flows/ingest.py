"""Ingest deployments: `ingest-ticker24h`, `ingest-orderbook`, `ingest-candles`.

Each flow runs its loop until cancelled, or for `duration_s` seconds (bounded segments, tests,
demos). The per-message work happens in `trading.ingest` without Prefect; the flow logs the
start (markets and where they came from, metrics URL) and the end summary.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger

from blocks.runtime import with_redis_user
from trading.config import Settings
from trading.ingest.candles import CandlesIngest
from trading.ingest.orderbook import OrderbookIngest
from trading.ingest.runner import IngestHandler, run_ingest
from trading.ingest.ticker24h import Ticker24hIngest
from trading.redis_conn import redis_url


async def _run(handler: IngestHandler, *, duration_s: float | None, metrics_port: int, lease_wait_s: float,
               universe_poll_s: float) -> dict[str, Any]:
    logger = get_run_logger()
    # A bad variable fails the run here, naming it; Redis as the ingest user when make up saved it.
    settings = await with_redis_user(Settings.from_env(), "ingest")
    with redis_url(settings) as url:
        logger.info("ingest %s starting (duration %s, metrics port %d)", handler.name,
                    "unbounded" if duration_s is None else f"{duration_s}s", metrics_port)
        summary = await run_ingest(handler, settings, redis_url=url, duration_s=duration_s,
                                   metrics_port=metrics_port, lease_wait_s=lease_wait_s,
                                   universe_poll_s=universe_poll_s)
    logger.info("ingest %s finished: %d markets (%s), %d lake rows, %d stream entries, %d reconnects, %s",
                summary.name, len(summary.markets), summary.market_source, summary.rows_written,
                summary.stream_entries, summary.reconnects, summary.handler)
    return asdict(summary)


@flow(name="ingest-ticker24h")
async def ingest_ticker24h(duration_s: float | None = None, metrics_port: int = 9611, lease_wait_s: float = 0.0,
                           universe_poll_s: float = 10.0) -> dict[str, Any]:
    """ticker24h for the selected markets into `bitvavo:ticker24h` and the lake.

    Args:
        duration_s: seconds this segment runs before it returns and the restart trigger starts the next;
            empty: until cancelled.
        metrics_port: port of this loop's Prometheus /metrics (on METRICS_HOST).
        lease_wait_s: seconds to wait for the Redis lease a previous run may still hold (up to its 15 s TTL);
            0: fail at once when another instance holds it.
        universe_poll_s: seconds between reads of `trading:universe`, to follow a changed market selection.
    """
    return await _run(Ticker24hIngest(), duration_s=duration_s, metrics_port=metrics_port,
                      lease_wait_s=lease_wait_s, universe_poll_s=universe_poll_s)


@flow(name="ingest-orderbook")
async def ingest_orderbook(duration_s: float | None = None, snapshot_every_s: float = 300.0,
                           metrics_port: int = 9612, lease_wait_s: float = 0.0,
                           universe_poll_s: float = 10.0) -> dict[str, Any]:
    """Local books for the selected markets: every update, the top of book, snapshots and gaps.

    Args:
        duration_s: seconds this segment runs before it returns and the restart trigger starts the next;
            empty: until cancelled.
        metrics_port: port of this loop's Prometheus /metrics (on METRICS_HOST).
        lease_wait_s: seconds to wait for the Redis lease a previous run may still hold (up to its 15 s TTL);
            0: fail at once when another instance holds it.
        snapshot_every_s: seconds between full book snapshots written to the lake per market.
        universe_poll_s: seconds between reads of `trading:universe`, to follow a changed market selection.
    """
    return await _run(OrderbookIngest(snapshot_every_s), duration_s=duration_s, metrics_port=metrics_port,
                      lease_wait_s=lease_wait_s, universe_poll_s=universe_poll_s)


@flow(name="ingest-candles")
async def ingest_candles(duration_s: float | None = None, intervals: list[str] | None = None,
                         backfill_buckets: int = 60, metrics_port: int = 9613, lease_wait_s: float = 0.0,
                         universe_poll_s: float = 10.0) -> dict[str, Any]:
    """Candles (default 1m and 5m) with REST backfill of missed buckets and known-empty records.

    Args:
        duration_s: seconds this segment runs before it returns and the restart trigger starts the next;
            empty: until cancelled.
        metrics_port: port of this loop's Prometheus /metrics (on METRICS_HOST).
        lease_wait_s: seconds to wait for the Redis lease a previous run may still hold (up to its 15 s TTL);
            0: fail at once when another instance holds it.
        intervals: candle intervals to record, e.g. ["1m", "5m"]; empty: 1m and 5m.
        backfill_buckets: how many buckets per interval the start-up REST backfill reaches back.
        universe_poll_s: seconds between reads of `trading:universe`, to follow a changed market selection.
    """
    return await _run(CandlesIngest(tuple(intervals or ("1m", "5m")), backfill_buckets), duration_s=duration_s,
                      metrics_port=metrics_port, lease_wait_s=lease_wait_s, universe_poll_s=universe_poll_s)
