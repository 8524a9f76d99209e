"""Injected faults for tests (set through POST /_sim/faults, see docs/simulator.md).

REST faults are consumed one per /v2 call that passed authentication and the rate limit.
`execute` decides whether the call still takes effect before the fault hits, which is what
makes "outcome uncertain" (101/109, timeouts) worth testing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RestFault:
    kind: str  # "error" (JSON error reply), "timeout" (hang, then close the connection) or "delay" (a late answer)
    execute: bool
    error_code: int = 0
    hang_seconds: float = 0.0


@dataclass
class _Pending:
    count: int
    fault: RestFault


class Faults:
    def __init__(self) -> None:
        self._rest: list[_Pending] = []
        self.feed_paused = False
        self._skip_nonce: set[str] = set()

    def add_rest_errors(self, count: int, error_code: int, execute: bool) -> None:
        self._rest.append(_Pending(count, RestFault("error", execute, error_code=error_code)))

    def add_rest_timeouts(self, count: int, hang_seconds: float, execute: bool) -> None:
        self._rest.append(_Pending(count, RestFault("timeout", execute, hang_seconds=hang_seconds)))

    def add_rest_delays(self, count: int, seconds: float) -> None:
        self._rest.append(_Pending(count, RestFault("delay", True, hang_seconds=seconds)))

    def take_rest_fault(self) -> RestFault | None:
        """The fault for this call, if any (queued faults apply in the order they were set)."""
        while self._rest:
            pending = self._rest[0]
            if pending.count <= 0:
                self._rest.pop(0)
                continue
            pending.count -= 1
            return pending.fault
        return None

    def skip_nonce(self, market: str) -> None:
        self._skip_nonce.add(market)

    def take_nonce_skip(self, market: str) -> bool:
        """True once after skip_nonce(market): the next book event's nonce jumps by 2."""
        if market in self._skip_nonce:
            self._skip_nonce.discard(market)
            return True
        return False

    def clear(self) -> None:
        self._rest.clear()
        self._skip_nonce.clear()
        self.feed_paused = False

    def snapshot(self) -> dict[str, object]:
        return {
            "feed_paused": self.feed_paused,
            "pending_rest_faults": [{"kind": p.fault.kind, "count": p.count, "error_code": p.fault.error_code,
                                     "hang_seconds": p.fault.hang_seconds, "execute": p.fault.execute}
                                    for p in self._rest if p.count > 0],
            "pending_nonce_skips": sorted(self._skip_nonce),
        }
