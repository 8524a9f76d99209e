"""The preflight drill never undoes an operator's kill switch, whether it was on before or set during the drill."""

from __future__ import annotations

import asyncio

from trading.bus import KEY_KILL, KEY_KILL_DRILL
from trading.kill_switch import set_kill_switch
from trading.preflight import Status, kill_switch_drill
from trading.redis_conn import async_client


async def test_an_operator_switch_set_during_the_drill_stays_on(redis_db_url: str) -> None:
    client = async_client(redis_db_url)
    try:
        drill = asyncio.create_task(kill_switch_drill(client, "signals:test", timeout_s=1.0))
        await asyncio.sleep(0.2)  # the drill holds the switch (no trading core here: it will fail)
        assert await client.get(KEY_KILL) == "1" and await client.exists(KEY_KILL_DRILL)
        await set_kill_switch(client, enabled=True, operator="alice", reason="incident")
        result = await drill
        assert result.status is Status.FAIL  # nothing blocked the test signal: no core ran
        assert await client.get(KEY_KILL) == "1"  # alice's switch survived the drill's restore
    finally:
        await client.aclose()


async def test_the_drill_restores_a_switch_that_was_off_and_leaves_one_that_was_on(redis_db_url: str) -> None:
    client = async_client(redis_db_url)
    try:
        await kill_switch_drill(client, "signals:test", timeout_s=0.2)
        assert await client.get(KEY_KILL) is None and not await client.exists(KEY_KILL_DRILL)
        await client.set(KEY_KILL, "1")
        await kill_switch_drill(client, "signals:test", timeout_s=0.2)
        assert await client.get(KEY_KILL) == "1"
    finally:
        await client.aclose()
