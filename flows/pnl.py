"""PnL deployment: `pnl-orchestrator`.

Runs the PnL loop (`trading.pnl_orchestrator`) until cancelled, or for `duration_s` seconds (the
bounded segments of the restart chain, tests, demos). Per-report work happens in the loop without
Prefect; the flow logs the start and the end summary.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from blocks.runtime import with_redis_user
from trading.config import Settings
from trading.pnl_orchestrator import DEFAULT_METRICS_PORT, run_pnl
from trading.redis_conn import redis_url


@flow(name="pnl-orchestrator")
async def pnl_orchestrator(duration_s: float | None = None, metrics_port: int = DEFAULT_METRICS_PORT,
                           lease_wait_s: float = 0.0, snapshot_every_s: float = 60.0) -> dict[str, Any]:
    """`orders:executed` into the paper and live ledgers; `trading:pnl:paper` and `trading:pnl:live`, lake
    snapshots (`pnl/`) and `trader_pnl_*` metrics.

    Args:
        duration_s: seconds this segment runs before it returns and the restart trigger starts the next;
            empty: until cancelled.
        metrics_port: port of this loop's Prometheus /metrics (on METRICS_HOST).
        lease_wait_s: seconds to wait for the Redis lease a previous run may still hold (up to its 15 s TTL);
            0: fail at once when another instance holds it.
        snapshot_every_s: seconds between PnL snapshots written to the lake (`pnl/`); one more at stop.
    """
    logger = get_run_logger()
    # A bad variable fails the run here, naming it; Redis as this loop's user when make up saved it.
    settings = await with_redis_user(Settings.from_env(), "pnl")
    with redis_url(settings) as url:
        logger.info("pnl-orchestrator starting (duration %s, metrics port %d, lake snapshots every %ss)",
                    "unbounded" if duration_s is None else f"{duration_s}s", metrics_port, snapshot_every_s)
        summary = await run_pnl(settings, redis_url=url, duration_s=duration_s, metrics_port=metrics_port,
                                lease_wait_s=lease_wait_s, snapshot_every_s=snapshot_every_s)
    pnl = summary["pnl"]
    logger.info("pnl-orchestrator finished: %d reports replayed, %d fills booked (%d duplicates skipped), "
                "%d dead-lettered; realized %s, fees %s, equity %s, exposure %s EUR",
                summary["replayed_entries"], summary["fills_applied"], summary["duplicate_fills"],
                summary["dead_lettered"], pnl["realized"], pnl["fees"], pnl["equity"], pnl["exposure"])
    return summary
