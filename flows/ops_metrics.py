"""Ops exporter deployment (`ops-metrics`): Redis memory and lake disk space as `trading_ops_*` (:9605),
and the notices relay: the `trading:events` a person must hear about become Prefect events.

The loop is `trading.ops_metrics.run_ops_exporter`; the alert rules that read it are in docs/alerts.md.
Each notice (trading/notices.py) is emitted as the Prefect event `trading.notice.<kind>` on the resource
`trading.market.<market>` (or `trading.stack`), with the loop's deployment page linked in its body; the
notification automations that `make up` creates from NOTIFY_URL match them (deployments/automations.py).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.events import emit_event
from prefect.utilities.urls import url_for

from blocks.runtime import load_settings
from trading.notices import Notice, Publish
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
                                             lease_wait_s=lease_wait_s, publish=await prefect_publisher())
    logger.info("ops-metrics finished (served %s)", metrics_url)
    return {"metrics_url": metrics_url}


async def prefect_publisher() -> Publish:
    """Notices as Prefect events, each body ending with the page of the deployment that recorded it."""
    async with get_client() as client:
        pages = {deployment.name: url_for("deployment", obj_id=deployment.id)
                 for deployment in await client.read_deployments()}
    logger = get_run_logger()

    async def publish(notice: Notice) -> None:
        page = pages.get(notice.loop)
        payload = notice.payload()
        payload["body"] = f"{notice.body}\nRecorded by {notice.loop}" + (f": {page}" if page else "")
        emitted = emit_event(event=notice.event, payload=payload, resource={
            "prefect.resource.id": notice.resource_id, "prefect.resource.name": notice.market or "trading stack",
            "trading.kind": notice.kind, "trading.severity": notice.severity, "trading.loop": notice.loop})
        if emitted is None:  # no events client (no API): the notice stays in the log
            logger.warning("notice not emitted as a Prefect event: %s", notice.subject)

    return publish
