"""What every long-running trading loop shares: the lease, its work, a bounded duration.

`run_guarded` holds `lease:<name>` while the loop's coroutines run side by side; losing the
lease, or any coroutine failing, stops them all (TaskGroup) and the error is re-raised
unwrapped so the flow run fails with the one cause. `duration_s` ends a bounded segment
cleanly (tests, demos, the restart chain of design §6).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import redis.asyncio

from trading.lease import Lease, RedisLease

log = logging.getLogger(__name__)

Work = Callable[[Lease], Sequence[Coroutine[Any, Any, None]]]


async def run_guarded(name: str, client: redis.asyncio.Redis, work: Work, *, duration_s: float | None = None,
                      lease_wait_s: float = 0.0, lease_ttl_ms: int = 15_000) -> Lease:
    """Run `work(lease)`'s coroutines under the lease until `duration_s` passes; returns the lease held."""
    lease = RedisLease(client, name, ttl_ms=lease_ttl_ms)
    held = await lease.acquire(wait_s=lease_wait_s)
    log.info("%s: lease acquired (fencing token %d)", name, held.fencing_token)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(duration_s), asyncio.TaskGroup() as tasks:
                tasks.create_task(lease.keep_renewed())
                for coroutine in work(held):
                    tasks.create_task(coroutine)
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        with contextlib.suppress(Exception):
            await lease.release()
    return held


async def every(interval_s: float, action: Callable[[], Coroutine[Any, Any, None]],
                *, swallow: tuple[type[BaseException], ...] = ()) -> None:
    """Call `action` every `interval_s` until cancelled; exceptions in `swallow` are skipped (e.g. Redis down)."""
    while True:
        await asyncio.sleep(interval_s)
        with contextlib.suppress(*swallow):
            await action()
