"""What every long-running trading loop shares: the lease, its work, a bounded duration, a clean stop.

`run_guarded` holds `lease:<name>` while the loop's coroutines run side by side (`run_together`);
losing the lease, or any coroutine failing, stops them all and the error is re-raised unwrapped
so the flow run fails with the one cause. `duration_s` ends a bounded segment cleanly (tests,
demos, the restart chain of design §6).

The lease is renewed on its own connections (trading/lease.py, `keep_renewed`), and the loop's
Redis client is gated by it (`redis_conn.CommandGate`): while the lease is not known held, every
command of the loop waits before it is sent, so the loop neither writes nor reads, and sends no
order (a live send is claimed in Redis first). When Redis was away (restarted, unreachable) the
loop pauses, re-acquires the lease with a new fencing token once Redis answers, and goes on where
it waited; nothing is cancelled, an entry being processed commits after the pause. It stops with
`LeaseLostError` only when another instance holds or held the lease meanwhile, or when Redis
stayed away `REDIS_AWAY_LIMIT_S` (5 min). docs/runbooks.md, "Redis restarts".

Stopping (an operator's cancel in the Prefect UI, which cancels the flow's task): the cancel is
passed to every coroutine, and one still running `RECANCEL_S` later (its own cleanup on cancel
must fit in that) is cancelled again, until all have ended. So a cancel lost inside a library
(Python 3.11's `asyncio.wait_for` drops one that lands as the awaited call completes) delays the
stop by seconds instead of leaving the loop trading; a cancel that such a library lost before the
loop started is honoured when `run_guarded` (or `run_together`) begins. Then the lease is released (bounded by
`LEASE_RELEASE_S`; with Redis down it expires by its TTL) and the cancellation propagates. A
loop stops well within `STOP_GRACE_S`; coroutines still running after that are named in a
`LoopStopError` (Prefect kills the process 30 s after the cancel anyway). A loop's own cleanup
in `finally` must be bounded the same way (`asyncio.timeout`), never an open-ended Redis or
network call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import redis.asyncio

from trading.lease import Lease, RedisLease
from trading.redis_conn import command_gate, dedicated_client

log = logging.getLogger(__name__)

Work = Callable[[Lease], Sequence[Coroutine[Any, Any, None]]]

STOP_GRACE_S = 10.0  # a cancelled loop has ended within this (docs/runbooks.md, "Stopping a loop")
RECANCEL_S = 3.0  # a coroutine's cleanup on cancel must end within this, or it is cancelled again
LEASE_RELEASE_S = 1.0


class LoopStopError(RuntimeError):
    """Coroutines of a loop kept running through `STOP_GRACE_S` of repeated cancels."""


async def run_guarded(name: str, client: redis.asyncio.Redis, work: Work, *, duration_s: float | None = None,
                      lease_wait_s: float = 0.0, lease_ttl_ms: int = 15_000) -> Lease:
    """Run `work(lease)`'s coroutines under the lease until `duration_s` passes; returns the lease held last
    (its fencing token is newer than the first one's when the lease was re-acquired after a Redis outage).

    `client` must come from `redis_conn.async_client`: its gate is what pauses the loop."""
    honour_lost_cancel()
    gate = command_gate(client)
    if gate is None:
        raise TypeError("run_guarded needs a client from trading.redis_conn.async_client (its commands are gated)")
    async with lease_client(client, lease_ttl_ms) as own:
        lease = RedisLease(own, name, ttl_ms=lease_ttl_ms)
        try:
            held = await lease.acquire(wait_s=lease_wait_s)
            log.info("%s: lease acquired (fencing token %d)", name, held.fencing_token)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(duration_s):
                    await run_together([lease.keep_renewed(gate=gate), *work(held)])
        finally:
            await release(lease)
            gate.open_until(math.inf)  # the loop's own cleanup after this runs as it always did
        return lease.latest or held


@contextlib.asynccontextmanager
async def lease_client(client: redis.asyncio.Redis, ttl_ms: int) -> AsyncIterator[redis.asyncio.Redis]:
    """The lease's own connections to the loop's server, every call bounded well inside the TTL."""
    own = dedicated_client(client, socket_timeout=min(ttl_ms / 5000, 3.0))
    try:
        yield own
    finally:
        with contextlib.suppress(redis.RedisError, OSError):
            async with asyncio.timeout(LEASE_RELEASE_S):
                await own.aclose()


async def release(lease: RedisLease) -> None:
    """Let go of the lease if this instance (maybe) holds it; Redis down: it expires by its TTL."""
    try:
        async with asyncio.timeout(LEASE_RELEASE_S):
            await lease.release()
    except (redis.RedisError, OSError) as exc:  # TimeoutError is an OSError
        log.warning("lease %r not released (%s: %s); it expires in at most %d ms", lease.name,
                    type(exc).__name__, exc, lease.ttl_ms)


async def run_together(coroutines: Sequence[Coroutine[Any, Any, Any]]) -> None:
    """Run the coroutines side by side until all have returned. The first failure, or a cancel of the
    caller, stops the others (`stop`); a failure is re-raised unwrapped when it is the only one, a
    cancel always propagates as the cancel."""
    try:
        honour_lost_cancel()
    except asyncio.CancelledError:
        for coroutine in coroutines:
            coroutine.close()  # never started: no "was never awaited" warning
        raise
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        pending: set[asyncio.Task[Any]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            if any(not task.cancelled() and task.exception() is not None for task in done):
                break
    finally:
        await stop(tasks)
    failures = [error for task in tasks if not task.cancelled() and (error := task.exception()) is not None]
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise BaseExceptionGroup("loop coroutines failed", failures)


def honour_lost_cancel() -> None:
    """Raise `CancelledError` when this task was cancelled and something swallowed it on the way here.

    `Task.cancelling()` counts the cancel requests nobody withdrew with `uncancel()` (as
    `asyncio.timeout` and `TaskGroup` do when they handle their own): above 0 in a running task,
    a cancel was lost, e.g. by Python 3.11's `wait_for` completing in the same step. Starting the
    loop anyway would make an operator's cancel start it instead of stopping it.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        log.warning("%s was cancelled and the cancel was lost on the way; stopping now", task.get_name())
        raise asyncio.CancelledError("a cancel lost earlier in this task")


async def stop(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel the tasks, again every `RECANCEL_S` while any still runs, until all have ended.

    A second cancel of the caller meanwhile does not abandon them (they would run on unowned): it
    is re-raised once they have ended. Raises `LoopStopError` naming those still running after
    `STOP_GRACE_S`.
    """
    deadline = asyncio.get_running_loop().time() + STOP_GRACE_S
    cancelled_again: asyncio.CancelledError | None = None
    rounds = 0
    while running := [task for task in tasks if not task.done()]:
        if asyncio.get_running_loop().time() >= deadline:
            names = ", ".join(_describe(task) for task in running)
            raise LoopStopError(f"still running {STOP_GRACE_S} s after being cancelled {rounds} times: {names}")
        if rounds:
            log.warning("still running %.1f s after a cancel; cancelling again: %s", rounds * RECANCEL_S,
                        ", ".join(_describe(task) for task in running))
        for task in running:
            task.cancel()
        rounds += 1
        try:
            await asyncio.wait(running, timeout=RECANCEL_S)
        except asyncio.CancelledError as exc:
            cancelled_again = exc
    if cancelled_again is not None:
        raise cancelled_again


def _describe(task: asyncio.Task[Any]) -> str:
    coroutine = task.get_coro()
    return getattr(coroutine, "__qualname__", task.get_name())


async def every(interval_s: float, action: Callable[[], Coroutine[Any, Any, None]],
                *, swallow: tuple[type[BaseException], ...] = ()) -> None:
    """Call `action` every `interval_s` until cancelled; exceptions in `swallow` are skipped (e.g. Redis down)."""
    while True:
        await asyncio.sleep(interval_s)
        with contextlib.suppress(*swallow):
            await action()
