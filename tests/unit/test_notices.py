"""Which `trading:events` become notices (trading/notices.py): the few a person must hear about, once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from trading.notices import QUIET_MS, RULES, NoticeRules

T0 = 1_767_225_600_000  # 2026-01-01 00:00:00 UTC


def event(event_type: str, ts: int = T0, market: str | None = None, **detail: Any) -> dict[str, Any]:
    return {"v": 1, "ts": ts, "type": event_type, "severity": "warning", "market": market,
            "intent_id": "i-1", "detail": detail}


def test_an_operators_kill_switch_is_announced_each_time_and_the_cores_refusals_never() -> None:
    rules = NoticeRules()
    on = rules.notice_for(event("kill_switch", enabled=True, was_enabled=False, operator="alice", reason="drill"))
    refused = rules.notice_for(event("kill_switch", T0 + 1, "BTC-EUR", signal_id="s-1", guard="kill_switch"))
    off = rules.notice_for(event("kill_switch", T0 + 2, enabled=False, was_enabled=True, operator="bob", reason="ok"))
    assert on is not None and off is not None and refused is None
    assert on.subject == "Kill switch ON: no new orders" and "alice" in on.body and "drill" in on.body
    assert off.subject == "Kill switch OFF: trading may resume"
    assert on.runbook == "docs/runbooks.md#kill-switch-and-flatten" and on.runbook in on.body
    assert on.event == "trading.notice.kill-switch" and on.resource_id == "trading.stack"
    assert on.loop == "kill-switch"


def test_routine_events_are_noise() -> None:
    rules = NoticeRules()
    noise = [event("reject", market="BTC-EUR", guard=guard) for guard in ("cooldown", "max_spread", "stale_data",
                                                                           "max_exposure_total", "no_inventory")]
    noise += [event(kind, market="BTC-EUR") for kind in ("intent", "order", "order_rejected", "order_outcome_unknown",
                                                        "open_intent_released", "something_new")]
    assert [rules.notice_for(e) for e in noise] == [None] * len(noise)
    assert rules.suppressed == 0  # noise is not a suppressed notice


def test_the_daily_loss_guard_is_announced_once_per_utc_day() -> None:
    rules = NoticeRules()
    trips = [event("reject", T0 + i * 60_000, "BTC-EUR", guard="daily_loss", measured="-120", limit="-100",
                   reason="realised -120 EUR today") for i in range(30)]
    notices = [n for n in (rules.notice_for(e) for e in trips) if n is not None]
    assert len(notices) == 1 and rules.suppressed == 29
    assert notices[0].market == "BTC-EUR" and notices[0].resource_id == "trading.market.BTC-EUR"
    assert "-120" in notices[0].body and "docs/runbooks.md#daily-loss-limit" in notices[0].body
    next_day = rules.notice_for(event("reject", T0 + 24 * 3_600_000, "ETH-EUR", guard="daily_loss"))
    assert next_day is not None and "(2026-01-02)" in next_day.subject


def test_dead_letters_are_announced_once_per_stream_per_quiet_window() -> None:
    rules = NoticeRules()

    def dead(ts: int, stream: str) -> dict[str, Any]:
        return event("dead_letter", ts, stream=stream, group="executor", source_id="1-0", cause="rejected",
                     reason="intent lacks 'market'")

    burst = [rules.notice_for(dead(T0 + i, "orders:shadow")) for i in range(100)]
    other = rules.notice_for(dead(T0 + 200, "bitvavo:book"))
    later = rules.notice_for(dead(T0 + QUIET_MS, "orders:shadow"))
    assert sum(n is not None for n in burst) == 1 and other is not None and later is not None
    first = burst[0]
    assert first is not None and first.subject == "Entries dead-lettered on orders:shadow"
    assert "intent lacks 'market'" in first.body and first.loop == "executor"


def test_preflight_no_go_is_throttled_and_an_operators_decision_never() -> None:
    rules = NoticeRules()
    checks = [rules.notice_for(event("go_live_decision", T0 + i * 3_600_000, decision="NO-GO",
                                     operator="preflight", reason="NO-GO: stale book")) for i in range(7)]
    assert [n is not None for n in checks] == [True, False, False, False, False, False, True]  # hourly, said 6-hourly
    decisions = [rules.notice_for(event("go_live_decision", T0 + i, decision="GO", operator="carol",
                                        reason="checklist reviewed", valid_until_ms=T0 + 12 * 3_600_000))
                 for i in range(2)]
    assert all(n is not None and n.subject == "Go-live decision: GO by carol" for n in decisions)
    assert decisions[0] is not None and "valid until 2026-01-01 12:00:00 UTC" in decisions[0].body


def test_money_faults_are_always_announced() -> None:
    rules = NoticeRules()
    anomalies = [rules.notice_for(event("ledger_anomaly", T0 + i, "BTC-EUR", mode="live", reason="sold beyond"))
                 for i in range(3)]
    lost = rules.notice_for(event("order_lost", reason="stored report unreadable"))
    refused = [rules.notice_for(event("intent_refused_by_executor", T0 + i, "BTC-EUR", rule="max_notional",
                                      reason="too big")) for i in range(3)]
    assert all(n is not None and n.severity == "critical" for n in anomalies)
    assert lost is not None and lost.kind == "order-lost"
    assert [n is not None for n in refused] == [True, False, False]  # a broken writer repeats: once per quiet window


def test_a_malformed_detail_does_not_break_the_rules() -> None:
    rules = NoticeRules()
    assert rules.notice_for({"v": 1, "ts": T0, "type": "kill_switch", "detail": "not json"}) is None
    flatten = rules.notice_for({"v": 1, "ts": T0, "type": "flatten", "detail": None})
    assert flatten is not None and flatten.subject == "Flatten by ?"


def test_every_runbook_link_points_at_a_section() -> None:
    """The anchors the messages link to are headings of docs/runbooks.md (GitHub's slug rule)."""
    runbook = (Path(__file__).resolve().parents[2] / "docs" / "runbooks.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-")
               for line in runbook.splitlines() if line.startswith("## ")}
    samples = {"kill_switch": {"enabled": True}, "reject": {"guard": "daily_loss"}, "go_live_decision": {}}
    for event_type, rule in RULES.items():
        for operator in ("preflight", "alice"):
            made = rule(event(event_type, **samples.get(event_type, {}), operator=operator))
            assert made is not None, event_type
            notice = made[0]
            assert notice.runbook.split("#")[1] in anchors, (event_type, notice.runbook)
            assert notice.runbook in notice.body
