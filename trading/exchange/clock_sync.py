"""The offset to the exchange clock, from `/time` samples we can trust (docs/exchange-client.md).

Signed requests carry our time plus this offset; Bitvavo refuses one that arrives outside its
access window (304). One `/time` call gives `server - midpoint(sent, received)`, which is wrong by
at most half its round trip. So the rule is:

- take several samples, each one request on its own (never a retried call: a retry hides a
  hung attempt inside the round trip);
- refuse every sample whose round trip exceeds `max_rtt_ms` (it cannot justify its offset);
- keep the sample with the smallest round trip;
- with no sample left, no offset: the caller keeps the one it had (`ClockSyncError`).

Pure: `best_sample` only reads the samples it is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from trading.exchange.errors import ExchangeUnavailableError

CLOCK_SAMPLES = 5
CLOCK_GOOD_SAMPLES = 3  # enough agreeing fast samples: stop asking
CLOCK_MAX_RTT_MS = 1_000  # half of it is the worst error we accept: well inside the 10 s access window
CLOCK_SAMPLE_TIMEOUT_S = 2.0
CLOCK_RESYNC_S = 600.0  # re-measured this often, and after any 304


class ClockSyncError(ExchangeUnavailableError):
    """No `/time` sample was fast enough to trust; the previous offset stays in use."""


@dataclass(frozen=True)
class ClockSample:
    sent_ms: int
    received_ms: int
    server_ms: int

    @property
    def rtt_ms(self) -> int:
        return self.received_ms - self.sent_ms

    @property
    def offset_ms(self) -> int:
        """Exchange clock minus ours, at the midpoint of the round trip."""
        return self.server_ms - (self.sent_ms + self.received_ms) // 2


def best_sample(samples: Iterable[ClockSample], max_rtt_ms: int = CLOCK_MAX_RTT_MS) -> ClockSample | None:
    """The fastest sample whose round trip is within `max_rtt_ms` (and not negative); None if none is."""
    usable = [s for s in samples if 0 <= s.rtt_ms <= max_rtt_ms]
    return min(usable, key=lambda s: s.rtt_ms, default=None)
