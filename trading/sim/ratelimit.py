"""Server-side weight budget (spec §2): per API key when signed, per IP otherwise.

The counter resets at the next whole minute. The call that would exceed the budget starts a ban
(1 min for a key, 15 min for an IP by default); every call during a ban is refused with 105.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

MINUTE_MS = 60_000


@dataclass(frozen=True)
class RateStatus:
    limit: int
    remaining: int
    reset_at_ms: int
    banned_until_ms: int  # 0 when the call was allowed

    @property
    def banned(self) -> bool:
        return self.banned_until_ms > 0

    def headers(self) -> dict[str, str]:
        return {
            "bitvavo-ratelimit-limit": str(self.limit),
            "bitvavo-ratelimit-remaining": str(self.remaining),
            "bitvavo-ratelimit-resetat": str(self.reset_at_ms),
        }


@dataclass
class _Budget:
    window_end_ms: int = 0
    used: int = 0
    banned_until_ms: int = 0


class RateLimiter:
    def __init__(self, limit: int, key_ban_ms: int, ip_ban_ms: int, clock_ms: Callable[[], int]) -> None:
        self.limit = limit
        self.key_ban_ms = key_ban_ms
        self.ip_ban_ms = ip_ban_ms
        self._clock_ms = clock_ms
        self._budgets: dict[str, _Budget] = {}

    def charge(self, identity: str, weight: int, *, is_key: bool) -> RateStatus:
        """Book `weight` for `identity` ('key:…' or 'ip:…'); the status says whether it was refused."""
        now = self._clock_ms()
        budget = self._budgets.setdefault(identity, _Budget())
        if now >= budget.window_end_ms:
            budget.window_end_ms = (now // MINUTE_MS + 1) * MINUTE_MS
            budget.used = 0
        if budget.banned_until_ms > now:
            return RateStatus(self.limit, 0, budget.window_end_ms, budget.banned_until_ms)
        if budget.banned_until_ms:
            # A served ban clears the budget (matters when the ban is shorter than the window).
            budget.banned_until_ms = 0
            budget.used = 0
        if budget.used + weight > self.limit:
            budget.used = self.limit
            budget.banned_until_ms = now + (self.key_ban_ms if is_key else self.ip_ban_ms)
            return RateStatus(self.limit, 0, budget.window_end_ms, budget.banned_until_ms)
        budget.used += weight
        return RateStatus(self.limit, self.limit - budget.used, budget.window_end_ms, 0)

    def reset(self) -> None:
        """Forget every counter and ban (control API)."""
        self._budgets.clear()

    def configure(self, *, limit: int | None = None, key_ban_ms: int | None = None,
                  ip_ban_ms: int | None = None) -> None:
        if limit is not None:
            self.limit = limit
        if key_ban_ms is not None:
            self.key_ban_ms = key_ban_ms
        if ip_ban_ms is not None:
            self.ip_ban_ms = ip_ban_ms

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {identity: {"used": b.used, "window_end_ms": b.window_end_ms, "banned_until_ms": b.banned_until_ms}
                for identity, b in self._budgets.items()}
