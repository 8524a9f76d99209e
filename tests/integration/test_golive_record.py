"""A GO decided while a NO-GO was recorded meanwhile does not overwrite it."""

from __future__ import annotations

import pytest

from trading.clock import now_ms
from trading.golive import DecisionSupersededError, latest_decided_ms, live_gate, record_decision
from trading.redis_conn import async_client


async def test_a_go_never_overwrites_a_decision_it_did_not_see(redis_db_url: str) -> None:
    client = async_client(redis_db_url)
    try:
        seen = await latest_decided_ms(client) or ""
        assert seen == ""
        await record_decision(client, decision="NO-GO", operator="preflight", reason="NO-GO: redis", decided_ms=1,
                              valid_for_ms=1)  # a scheduled preflight fails while go-live is deciding
        with pytest.raises(DecisionSupersededError):
            await record_decision(client, decision="GO", operator="alice", reason="go", decided_ms=now_ms(),
                                  valid_for_ms=3_600_000, unless_changed_since=seen)
        assert not (await live_gate(client, now_ms())).open
        seen = await latest_decided_ms(client) or ""
        await record_decision(client, decision="GO", operator="alice", reason="go", decided_ms=now_ms(),
                              valid_for_ms=3_600_000, unless_changed_since=seen)
        assert (await live_gate(client, now_ms())).open
    finally:
        await client.aclose()
