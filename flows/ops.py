"""Operator actions as deployments (`kill-switch`, `flatten`): `operator` and `reason` are parameters,
so every action is a flow run in the history with who and why, plus an artifact."""

from __future__ import annotations

import asyncio
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

from blocks.runtime import load_settings
from trading.events import Severity, queue_event
from trading.exchange.rest import BitvavoRest
from trading.flatten import FlattenReport, flatten_exchange, report_detail
from trading.kill_switch import require_operator, set_kill_switch
from trading.redis_conn import connected


@flow(name="kill-switch")
async def kill_switch(enabled: bool, operator: str, reason: str) -> dict[str, Any]:
    """Switch the kill switch on (`enabled=true`: every new order is blocked) or off."""
    require_operator(operator, reason)
    logger = get_run_logger()
    settings = await load_settings()
    async with connected(settings) as client:
        change = await set_kill_switch(client, enabled=enabled, operator=operator, reason=reason)
    state = "ON — every new order is blocked" if enabled else "OFF — orders may flow (subject to the guards)"
    logger.info("kill switch %s (was %s) by %s: %s", "ON" if enabled else "OFF",
                "on" if change.was_enabled else "off", operator, reason)
    await acreate_markdown_artifact(key="kill-switch", description=f"kill switch {'ON' if enabled else 'OFF'}",
                                    markdown=f"## Kill switch {state}\n\n- operator: {operator}\n- reason: {reason}\n"
                                             f"- previous state: {'on' if change.was_enabled else 'off'}\n")
    return {"enabled": enabled, "was_enabled": change.was_enabled, "operator": operator, "reason": reason}


@flow(name="flatten")
async def flatten(operator: str, reason: str, close_positions: bool = False,
                  markets: list[str] | None = None) -> dict[str, Any]:
    """Kill switch on, cancel every open order at the exchange, and with `close_positions` sell at market.

    In dry-run nothing is at the exchange: the kill switch goes on and the paper positions stay
    (they are simulated). The kill switch stays on afterwards; switch it off with `kill-switch`.
    """
    require_operator(operator, reason)
    logger = get_run_logger()
    settings = await load_settings()
    async with connected(settings) as client:
        await set_kill_switch(client, enabled=True, operator=operator, reason=f"flatten: {reason}")
        if not settings.has_credentials:  # whatever DRY_RUN says: flatten acts wherever orders can exist
            report = FlattenReport()
            mode = "no credentials: no orders at the exchange; paper positions left as they are"
        else:
            selected = markets or list(settings.markets_or_default())
            rest = BitvavoRest(settings.bitvavo_rest_url, api_key=settings.bitvavo_api_key,
                               api_secret=settings.bitvavo_api_secret, operator_id=settings.bitvavo_operator_id)
            try:
                report = await asyncio.to_thread(flatten_exchange, rest, selected,
                                                 close_positions=close_positions)
            finally:
                rest.close()
            mode = f"live: {len(report.cancelled)} orders cancelled, {len(report.sold)} positions sold"
        async with client.pipeline(transaction=True) as tx:
            queue_event(tx, "flatten", Severity.CRITICAL, detail={
                "operator": operator, "reason": reason, "close_positions": close_positions, "mode": mode,
                **report_detail(report)})
            await tx.execute()
    logger.info("flatten by %s (%s): %s", operator, reason, mode)
    await acreate_table_artifact(key="flatten", table=report.rows() or [{"action": "none", "detail": mode}],
                                 description=f"flatten by {operator}: {mode}")
    if report.errors:
        raise FlattenIncomplete(f"flatten left errors: {report.errors}")
    return {"mode": mode, **report_detail(report)}


class FlattenIncomplete(RuntimeError):
    """Some markets could not be cancelled or sold; the artifact lists them."""
