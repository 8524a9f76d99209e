"""Ops exporter deployment (`ops-metrics`): Redis memory and lake disk space as `trading_ops_*` (:9605).

The loop is `trading.ops_metrics.run_ops_exporter`; the alert rules that read it are in docs/alerts.md.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from blocks.runtime import load_settings
from trading.ops_metrics import DEFAULT_INTERVAL_S, DEFAULT_METRICS_PORT, run_ops_exporter
from trading.redis_conn import redis_url


@flow(name="ops-metrics")
async def ops_metrics(duration_s: float | None = None, metrics_port: int = DEFAULT_METRICS_PORT,
                      interval_s: float = DEFAULT_INTERVAL_S, lease_wait_s: float = 0.0) -> dict[str, Any]:
    """Serve Redis memory and the lake's free disk space for the alert rules.

    Args:
        duration_s: seconds this segment runs before it returns and the restart trigger starts the next;
            empty: until cancelled.
        metrics_port: port of this loop's Prometheus /metrics (on METRICS_HOST).
        lease_wait_s: seconds to wait for the Redis lease a previous run may still hold (up to its 15 s TTL);
            0: fail at once when another instance holds it.
        interval_s: seconds between readings of Redis memory and the lake's disk space.
    """
    logger = get_run_logger()
    settings = await load_settings(redis_role="ops-metrics")  # a bad variable fails the run here, naming it
    with redis_url(settings) as url:
        logger.info("ops-metrics starting (duration %s, metrics port %d, readings every %ss)",
                    "unbounded" if duration_s is None else f"{duration_s}s", metrics_port, interval_s)
        metrics_url = await run_ops_exporter(settings, redis_url=url, duration_s=duration_s,
                                             metrics_port=metrics_port, interval_s=interval_s,
                                             lease_wait_s=lease_wait_s)
    logger.info("ops-metrics finished (served %s)", metrics_url)
    return {"metrics_url": metrics_url}
