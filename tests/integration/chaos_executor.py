"""The live executor as its own process, so the chaos run can SIGKILL it mid-call (tests/integration/chaos.py).

Settings come from the environment (as a deployment's worker gives them); the venue options are
short so that uncertain sends resolve within the run.
"""

from __future__ import annotations

import asyncio
import logging
import os

from trading.config import Settings
from trading.execution.executor import run_executor
from trading.execution.live import LiveVenue
from trading.redis_conn import async_client


async def main() -> None:
    settings = Settings.from_env()
    url = os.environ["REDIS_URL"]
    venue = LiveVenue(async_client(url), settings, request_timeout_s=1.0, uncertainty_margin_ms=300,
                      lookup_grace_ms=1000, poll_interval_s=0.1, reconcile_interval_s=0.5)
    await run_executor(settings, redis_url=url, venue=venue, metrics_port=0, poll_interval_s=0.1,
                       lease_wait_s=30.0, gauge_interval_s=0.5)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
