"""The ops exporter: what no trading loop measures about its surroundings, as `trading_ops_*` on :9605.

Redis memory (INFO memory) and the free space of the lake's file system are what the alert
rules `RedisMemoryHigh`, `LakeDiskLow` and `LakeDiskFillingUp` read. It runs as its own small
loop under the lease `ops-metrics` (one instance) so that these alerts do not depend on any
trading loop being up. Given a `publish` callback (the flow passes one that emits Prefect events),
the same loop runs the notices relay (trading/notices.py): the few `trading:events` a person must
hear about, published as they happen. Its only writes are the relay group's acknowledgements.

    python -m trading.ops_metrics            # until Ctrl-C; REDIS_URL, PARQUET_DIR, METRICS_HOST from env
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import redis.asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.exceptions import RedisError

from trading.config import Settings
from trading.lease import Lease
from trading.log_sampling import worth_logging
from trading.loop import every, run_guarded
from trading.metrics import LabelCache, MetricsEndpoint
from trading.notices import NoticeMetrics, NoticeRelay, Publish
from trading.redis_conn import async_client, memory_limit, redis_url

log = logging.getLogger(__name__)

LOOP_NAME = "ops-metrics"  # lease and log name
DEFAULT_METRICS_PORT = 9605
DEFAULT_INTERVAL_S = 15.0


class OpsMetrics:
    """`trading_ops_*`: Redis memory, the lake's disk and the notices relay."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.redis_up = Gauge("trading_ops_redis_up", "1 while Redis answers INFO", registry=r)
        self.redis_used_memory = Gauge("trading_ops_redis_used_memory_bytes", "Redis used_memory", registry=r)
        self.redis_memory_limit = Gauge("trading_ops_redis_memory_limit_bytes",
                                        "Redis maxmemory, or the host's total memory when maxmemory is 0",
                                        registry=r)
        self.lake_free = Gauge("trading_ops_lake_free_bytes",
                               "Bytes available to the lake's writers on PARQUET_DIR's file system", registry=r)
        self.lake_size = Gauge("trading_ops_lake_size_bytes", "Size of PARQUET_DIR's file system", registry=r)
        self.refresh_errors = LabelCache(Counter("trading_ops_refresh_errors", "Failed readings, by source",
                                                 ["source"], registry=r))
        self.notices = NoticeMetrics(r)


def existing_ancestor(path: Path) -> Path:
    """The path itself, or its nearest existing parent: a lake not created yet lives on that file system."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class OpsExporter:
    """Reads Redis and the lake's file system into `OpsMetrics`."""

    def __init__(self, client: redis.asyncio.Redis, lake_dir: Path, metrics: OpsMetrics) -> None:
        self.client: Any = client  # redis-py's async stubs type replies as sync|async unions
        self.lake_dir = lake_dir
        self.metrics = metrics
        self.failures = 0

    async def refresh(self) -> None:
        await self.refresh_redis()
        self.refresh_lake()

    async def refresh_redis(self) -> None:
        try:
            info = await self.client.info("memory")
        except (RedisError, OSError) as exc:
            self._failed("redis", exc)
            self.metrics.redis_up.set(0)
            return
        self.metrics.redis_up.set(1)
        self.metrics.redis_used_memory.set(int(info["used_memory"]))
        self.metrics.redis_memory_limit.set(memory_limit(info)[0])

    def refresh_lake(self) -> None:
        try:
            usage = shutil.disk_usage(existing_ancestor(self.lake_dir))
        except OSError as exc:
            self._failed("lake", exc)
            return
        self.metrics.lake_free.set(usage.free)
        self.metrics.lake_size.set(usage.total)

    def _failed(self, source: str, exc: BaseException) -> None:
        self.failures += 1
        self.metrics.refresh_errors(source).inc()
        if worth_logging(self.failures):
            log.warning("ops metrics: reading %s failed (%s: %s)", source, type(exc).__name__, exc)


async def run_ops_exporter(settings: Settings, *, redis_url: str, duration_s: float | None = None,
                           metrics_port: int = DEFAULT_METRICS_PORT, interval_s: float = DEFAULT_INTERVAL_S,
                           lease_wait_s: float = 0.0, publish: Publish | None = None) -> str:
    """Serve `trading_ops_*` for `duration_s` (None: until cancelled), and relay notices to `publish` when
    given; returns the metrics URL it served."""
    if interval_s <= 0:
        raise ValueError(f"interval_s must be positive, got {interval_s}")
    metrics = OpsMetrics()
    client = async_client(redis_url)
    exporter = OpsExporter(client, settings.parquet_dir, metrics)
    endpoint = MetricsEndpoint(metrics.registry, settings.metrics_host, metrics_port)

    async def first_reading() -> None:
        await exporter.refresh()  # before the first interval: a scrape right after start sees values

    def work(_lease: Lease) -> list[Coroutine[Any, Any, None]]:
        endpoint.start()  # only once the lease is ours: a second instance fails on the lease, not the port
        log.info("ops metrics: Redis memory and %s disk on %s every %ss", settings.parquet_dir, endpoint.url,
                 interval_s)
        coroutines = [first_reading(), every(interval_s, exporter.refresh)]
        if publish is not None:
            coroutines.append(NoticeRelay(client, publish, metrics.notices).run())
        return coroutines

    try:
        await run_guarded(LOOP_NAME, client, work, duration_s=duration_s, lease_wait_s=lease_wait_s)
    finally:
        endpoint.stop()
        await client.aclose()
    return endpoint.url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trading.ops_metrics",
                                     description="Export Redis memory and lake disk space as trading_ops_*.")
    parser.add_argument("--port", type=int, default=DEFAULT_METRICS_PORT)
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, help="seconds between readings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = Settings.from_env()
    with redis_url(settings) as url, contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_ops_exporter(settings, redis_url=url, metrics_port=args.port, interval_s=args.interval))
    return 0


if __name__ == "__main__":
    sys.exit(main())
