"""A weight-based rate governor shared by every caller in a process (spec §2).

Bitvavo allows 1000 weight points per minute per API key (or per IP when unsigned), resets the
counter at the next whole minute and bans for 1 (key) or 15 (IP) minutes on excess. We book each
call's weight locally before sending, take the server's `remaining`/`resetat` headers as the
truth when they are more conservative, and after an errorCode 105 refuse or delay every call
until the ban ends. A headroom is kept for critical calls (cancels), so market-data polling can
never starve an order cancel.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from pydantic import SecretStr

from trading.clock import now_ms
from trading.exchange.errors import RateLimitBannedError, ban_message
from trading.exchange.weights import RATE_LIMIT_PER_MINUTE

MINUTE_MS = 60_000


class RateBudgetExhaustedError(RuntimeError):
    """Waiting for the budget would take longer than the caller allows."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"rate budget exhausted; next slot in {wait_s:.1f}s")
        self.wait_s = wait_s


@dataclass(frozen=True)
class GovernorState:
    limit: int
    used: int
    remaining: int
    window_end_ms: int
    banned_until_ms: int


class RateGovernor:
    def __init__(self, limit: int = RATE_LIMIT_PER_MINUTE, *, critical_headroom: int = 50,
                 max_wait_s: float = 65.0, clock_ms: Callable[[], int] = now_ms) -> None:
        self.limit = limit
        self.critical_headroom = critical_headroom
        self.max_wait_s = max_wait_s
        self._clock_ms = clock_ms
        self._lock = threading.Lock()
        self._window_end_ms = 0
        self._used = 0
        self._banned_until_ms = 0

    def _roll(self, now: int) -> None:
        if now >= self._window_end_ms:
            self._window_end_ms = (now // MINUTE_MS + 1) * MINUTE_MS
            self._used = 0

    def try_reserve(self, weight: int, *, critical: bool = False) -> float:
        """Book `weight` if it fits now and return 0.0; otherwise book nothing and return the wait in s."""
        with self._lock:
            now = self._clock_ms()
            if now < self._banned_until_ms:
                return (self._banned_until_ms - now) / 1000
            self._roll(now)
            ceiling = self.limit if critical else self.limit - self.critical_headroom
            if self._used + weight <= ceiling:
                self._used += weight
                return 0.0
            return max(self._window_end_ms - now, 1) / 1000

    def acquire(self, weight: int, *, critical: bool = False) -> None:
        """Block until `weight` is booked; raise instead of waiting longer than `max_wait_s`."""
        while True:
            wait = self.try_reserve(weight, critical=critical)
            if wait == 0.0:
                return
            self._check_wait(wait)
            time.sleep(wait)

    async def acquire_async(self, weight: int, *, critical: bool = False) -> None:
        while True:
            wait = self.try_reserve(weight, critical=critical)
            if wait == 0.0:
                return
            self._check_wait(wait)
            await asyncio.sleep(wait)

    def _check_wait(self, wait: float) -> None:
        if wait <= self.max_wait_s:
            return
        with self._lock:
            banned_until = self._banned_until_ms
        if banned_until > self._clock_ms():
            raise RateLimitBannedError(105, ban_message(banned_until))
        raise RateBudgetExhaustedError(wait)

    def observe_headers(self, remaining: int | None, reset_at_ms: int | None) -> None:
        """Adopt the server's view when it says less is left than we think."""
        with self._lock:
            now = self._clock_ms()
            self._roll(now)
            if reset_at_ms is not None:
                if reset_at_ms <= now:
                    return  # a reply from a minute that has ended: its count is not this minute's
                self._window_end_ms = reset_at_ms
            if remaining is not None:
                self._used = max(self._used, self.limit - remaining)

    def observe_ban(self, banned_until_ms: int | None) -> None:
        with self._lock:
            until = banned_until_ms if banned_until_ms is not None else self._clock_ms() + MINUTE_MS
            self._banned_until_ms = max(self._banned_until_ms, until)

    def state(self) -> GovernorState:
        with self._lock:
            now = self._clock_ms()
            self._roll(now)
            return GovernorState(self.limit, self._used, max(self.limit - self._used, 0), self._window_end_ms,
                                 self._banned_until_ms)


_registry: dict[str, RateGovernor] = {}
_registry_lock = threading.Lock()


def budget_identity(rest_url: str, api_key: SecretStr | None = None) -> str:
    """Who Bitvavo charges: the API key when calls are signed, else our IP towards that host."""
    if api_key is not None:
        return "key:" + hashlib.sha256(api_key.get_secret_value().encode()).hexdigest()[:16]
    return "ip:" + (urlsplit(rest_url).hostname or rest_url)


def shared_governor(identity: str) -> RateGovernor:
    """The process-wide governor for one budget owner (see `budget_identity`)."""
    with _registry_lock:
        governor = _registry.get(identity)
        if governor is None:
            governor = _registry[identity] = RateGovernor()
        return governor
