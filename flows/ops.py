"""Operator actions as deployments (`kill-switch`, ...): `operator` and `reason` are parameters,
so every action is a flow run in the history with who and why, plus an artifact."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact

from blocks.runtime import load_settings
from trading.kill_switch import require_operator, set_kill_switch
from trading.redis_conn import async_client, redis_url


@flow(name="kill-switch")
async def kill_switch(enabled: bool, operator: str, reason: str) -> dict[str, Any]:
    """Switch the kill switch on (`enabled=true`: every new order is blocked) or off."""
    require_operator(operator, reason)
    logger = get_run_logger()
    settings = await load_settings()
    with redis_url(settings) as url:
        client = async_client(url)
        try:
            change = await set_kill_switch(client, enabled=enabled, operator=operator, reason=reason)
        finally:
            await client.aclose()
    state = "ON — every new order is blocked" if enabled else "OFF — orders may flow (subject to the guards)"
    logger.info("kill switch %s (was %s) by %s: %s", "ON" if enabled else "OFF",
                "on" if change.was_enabled else "off", operator, reason)
    await acreate_markdown_artifact(key="kill-switch", description=f"kill switch {'ON' if enabled else 'OFF'}",
                                    markdown=f"## Kill switch {state}\n\n- operator: {operator}\n- reason: {reason}\n"
                                             f"- previous state: {'on' if change.was_enabled else 'off'}\n")
    return {"enabled": enabled, "was_enabled": change.was_enabled, "operator": operator, "reason": reason}
