"""The chaos run (tests/integration/chaos.py), bounded: live mode on the simulator, every fault one by one
and all together, then the promises an operator relies on. `make chaos` runs the same, longer."""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.chaos import MARKETS, ChaosResult, run_chaos
from tests.integration.conftest import SimHandle

pytestmark = pytest.mark.integration

PHASE_S = float(os.environ.get("CHAOS_PHASE_S", "8"))
KILL_SWITCH_BOUND_MS = 1_000


@pytest.mark.timeout(max(300, int(PHASE_S * 7 * 3 + 240)))
async def test_chaos_keeps_every_promise(sim_factory: Callable[..., SimHandle], tmp_path: Path) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"CHAOS_SEED={seed} CHAOS_PHASE_S={PHASE_S}")
    sim = sim_factory(markets=",".join(MARKETS), book_rate=20)
    result = await run_chaos(sim, tmp_path, phase_s=PHASE_S, seed=seed)
    print(f"chaos counts: {result.counts}")
    check(result)


def check(result: ChaosResult) -> None:
    assert result.counts.get("orders", 0) >= 20, f"too few orders to prove anything: {result.counts}"
    # At most one exchange order per clientOrderId.
    per_client_id = Counter(o["clientOrderId"] for o in result.orders)
    assert not [cid for cid, n in per_client_id.items() if n > 1], "an intent was sent twice"
    # Every exchange fill is in the live ledger exactly once (the ledger books a fill id once; none missing,
    # none invented).
    assert result.live_ledger.fill_ids == result.exchange_fill_ids
    # No new order more than the bound after the kill switch went on, until it went off.
    for on, off in result.kill_windows:
        late = [o for o in result.orders if on + KILL_SWITCH_BOUND_MS < o["created"] <= off]
        assert not late, f"orders created while the kill switch was on: {late}"
    # Every malformed entry was dead-lettered with a reason (an intent the executor refused is dead-lettered
    # too, with its check's reason).
    for stream, markers in result.malformed.items():
        for marker in markers:
            reason = result.dead.get(stream, {}).get(marker)
            assert reason, f"malformed entry {marker} on {stream} not dead-lettered"
    # Every loop is running at the end, holding its lease.
    assert all(result.loops_running.values()), result.loops_running
    assert result.counts.get("settled") == 1, "open intents never settled"
