"""Operator actions as deployments (`kill-switch`, `flatten`): `operator` and `reason` are parameters,
so every action is a flow run in the history with who and why, plus an artifact."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

from blocks.runtime import load_settings
from trading.events import Severity, queue_event
from trading.flatten import DEFAULT_WAIT_S, SCOPES, flatten_positions
from trading.kill_switch import require_operator, set_kill_switch
from trading.orders import FlattenScope
from trading.redis_conn import connected


@flow(name="kill-switch")
async def kill_switch(enabled: bool, operator: str, reason: str) -> dict[str, Any]:
    """Switch the kill switch on (`enabled=true`: every new order is blocked) or off.

    `enabled` has no default: the operator chooses on or off on every run.

    Args:
        enabled: true switches the kill switch ON (every new order is blocked); false switches it OFF.
        operator: who is acting (your name); kept on the run, the artifact and trading:events.
        reason: why; kept with the change.
    """
    require_operator(operator, reason)
    logger = get_run_logger()
    settings = await load_settings(redis_role="kill-switch")
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
async def flatten(operator: str, reason: str, close_positions: bool = False, markets: list[str] | None = None,
                  scope: FlattenScope = "ledger", wait_s: float = DEFAULT_WAIT_S) -> dict[str, Any]:
    """Kill switch on; live: cancel the open orders; with `close_positions`, sell the mode's positions.

    The sales go through the executor as flatten intents, so each is an execution report in
    `orders:executed` and the ledger of the mode realises it (trading/flatten.py). Dry-run sells the
    paper ledger's positions on the paper venue and never calls the exchange's authenticated
    endpoints. Live sells the live ledger's positions capped by the available balances, or with
    `scope=account` everything available (a dedicated account). The run waits up to `wait_s` for
    the executor's reports and fails, naming them, when a sale has none, or did not fill in full.
    The kill switch stays on afterwards; switch it off with `kill-switch`.

    Args:
        operator: who is acting (your name); kept on the run, the artifact and trading:events.
        reason: why; kept with the flatten event.
        close_positions: also sell the positions at market; false only cancels the open orders.
        markets: only these markets, e.g. ["BTC-EUR"]; empty: the configured markets and every held position.
        scope: live only: `ledger` sells the live ledger's positions (capped by the balances); `account`
            sells everything available (a dedicated account).
        wait_s: seconds to wait for the executor's reports of the sales before the run fails naming them.
    """
    require_operator(operator, reason)
    if scope not in SCOPES:
        raise ValueError(f"scope must be ledger or account, got {scope!r}")
    logger = get_run_logger()
    settings = await load_settings(redis_role="flatten")
    if settings.dry_run and scope == "account":
        raise ValueError("scope=account is for live flatten only: dry-run sells the paper ledger's positions")
    async with connected(settings) as client:
        await set_kill_switch(client, enabled=True, operator=operator, reason=f"flatten: {reason}")
        report = await flatten_positions(client, settings, markets=markets, close_positions=close_positions,
                                         scope=scope, wait_s=wait_s)
        summary = (f"{report.mode}: {len(report.cancelled)} orders cancelled, "
                   f"{sum(1 for sale in report.sales if sale['status'] == 'filled')} of {len(report.sales)} sales "
                   f"filled, {len(report.skipped)} skipped, {len(report.unreported)} without a report")
        async with client.pipeline(transaction=True) as tx:
            queue_event(tx, "flatten", Severity.CRITICAL, detail={
                "operator": operator, "reason": reason, "close_positions": close_positions, "summary": summary,
                **report.detail()})
            await tx.execute()
    logger.info("flatten by %s (%s): %s", operator, reason, summary)
    await acreate_table_artifact(key="flatten", table=report.rows() or [{"action": "none", "detail": summary}],
                                 description=f"flatten by {operator}: {summary}")
    if not report.complete:
        raise FlattenIncomplete(f"flatten incomplete ({summary}); see the artifact: errors {report.errors}, "
                                f"sales not filled {[s for s in report.sales if s['status'] != 'filled']}")
    return {"summary": summary, **report.detail()}


class FlattenIncomplete(RuntimeError):
    """An order could not be cancelled, or a sale has no report or did not fill in full; the artifact lists them."""
