"""Dry-run end to end on the simulator: ticks → signals → intents → paper executions → trading:pnl:paper.

The PnL the orchestrator publishes is compared with a ledger this test computes itself from
the fills in `orders:executed` (average cost, fees in EUR), so the two implementations must
agree to the cent on whatever the market did during the run.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from tests.integration.conftest import SimHandle
from tests.integration.stack import running_stack, stack_settings
from trading.bus import (
    EXECUTION_SCHEMA,
    INTENT_SCHEMA,
    KEY_PNL_LIVE,
    KEY_PNL_PAPER,
    ORDERS_EXECUTED,
    ORDERS_SHADOW,
    decode_entry,
)

D = Decimal


def _own_ledger(executions: list[dict[str, Any]]) -> dict[str, Decimal]:
    """Average-cost realised PnL, position and fees per market, from the fills alone (long-only here:
    the baseline strategy buys and sells around the mean, sells never exceed what was bought)."""
    position: dict[str, Decimal] = {}
    cost: dict[str, Decimal] = {}
    realized = fees = D(0)
    for execution in executions:
        market = execution["market"]
        for fill in execution["fills"]:
            amount, price, fee = D(fill["amount"]), D(fill["price"]), D(fill["fee"])
            assert fill["fee_currency"] == "EUR"
            fees += fee
            held, basis = position.get(market, D(0)), cost.get(market, D(0))
            if execution["side"] == "buy":
                position[market], cost[market] = held + amount, basis + amount * price
            else:
                average = basis / held if held else D(0)
                sold = min(amount, held)
                realized += sold * (price - average)
                position[market], cost[market] = held - sold, basis - sold * average
    return {"realized": realized, "fees": fees, **{f"{m}:position": p for m, p in position.items()}}


async def test_signals_become_paper_executions_and_the_pnl_matches_an_independent_ledger(
        sim: SimHandle, redis_db_url: str, tmp_path: Path) -> None:
    settings = stack_settings(sim, redis_db_url, tmp_path / "lake")
    async with running_stack(settings, redis_db_url) as stack:
        await stack.wait_until_running()
        client = stack.client
        async with asyncio.timeout(60):
            while True:
                pnl = await client.hgetall(KEY_PNL_PAPER)
                if int(pnl.get("fills", "0")) >= 3:
                    break
                await asyncio.sleep(0.5)
        await stack.stop_loop("signal-engine")  # no new intents; let the rest settle
        await asyncio.sleep(2.0)
        executions = [decode_entry(f, EXECUTION_SCHEMA) for _id, f in await client.xrange(ORDERS_EXECUTED)]
        intents = {f["intent_id"]: decode_entry(f, INTENT_SCHEMA) for _id, f in await client.xrange(ORDERS_SHADOW)}
        signal_ids = {f["signal_id"] for _id, f in await client.xrange(settings.signal_stream)}
        pnl = await client.hgetall(KEY_PNL_PAPER)
        live_book = await client.hgetall(KEY_PNL_LIVE)

    assert live_book["fills"] == "0"  # paper fills never reach the live book
    assert pnl["anomalies"] == "0"  # spot: no sell went beyond what the paper book held
    assert executions, "no paper executions"
    for execution in executions:  # every execution traces back to an intent and its signal
        intent = intents[execution["intent_id"]]
        assert intent["signal_id"] in signal_ids
        assert execution["dry_run"] is True and intent["dry_run"] is True
    fills = [fill for e in executions for fill in orjson.loads(orjson.dumps(e["fills"]))]
    assert len({fill["fill_id"] for fill in fills}) == len(fills)
    expected = _own_ledger(executions)
    assert D(pnl["fees"]) == expected["fees"] > 0
    assert D(pnl["realized"]) == expected["realized"]
    for key, value in expected.items():
        if key.endswith(":position"):
            assert D(pnl[key]) == value, key
    assert int(pnl["fills"]) == len(fills)
    held = [key.removesuffix(":position") for key in expected if key.endswith(":position")]
    assert D(pnl["exposure"]) == sum(abs(D(pnl[f"{m}:position"])) * D(pnl[f"{m}:mark"]) for m in held)
