"""Preflight's pure checks: "not yet due" is not "failed" (SKIP dry-run, FAIL live, with the command that
clears it), the NO-GO message lists the failed checks, and ages are never negative."""

from __future__ import annotations

from typing import Any

import pytest

from trading.preflight import (
    ScheduleHistory,
    Status,
    Verdict,
    age_ms,
    check_ran_within,
    check_streams_fresh,
    failed,
    passed,
    skipped,
)

HOUR = 3_600_000
NOW = 1_790_000_000_000
WINDOW = 26 * HOUR


def test_completed_within_the_window_passes_in_both_modes() -> None:
    history = ScheduleHistory(NOW - 2 * HOUR, "backup/backup", ("Completed", NOW - 2 * HOUR))
    for live in (False, True):
        result = check_ran_within("backup ran within 26 h", history, WINDOW, NOW, live=live)
        assert (result.status, result.detail) == (Status.PASS, "last completed 2.0 h ago")


def test_a_fresh_stack_is_not_yet_due_skip_in_dry_run_fail_live_with_the_command_to_clear_it() -> None:
    fresh = ScheduleHistory(None, "backup/backup", None)  # deployed, no scheduled run has come due
    dry = check_ran_within("backup ran within 26 h", fresh, WINDOW, NOW, live=False)
    live = check_ran_within("backup ran within 26 h", fresh, WINDOW, NOW, live=True)
    assert (dry.status, live.status) == (Status.SKIP, Status.FAIL)
    assert dry.detail == live.detail == (
        "not yet due: never completed, and no scheduled run has come due since the stack was deployed; "
        "to clear it now: `prefect deployment run backup/backup`")


def test_a_due_run_that_failed_is_a_failure_not_not_yet_due() -> None:
    history = ScheduleHistory(None, "backup/backup", ("Failed", NOW - 3 * HOUR))
    result = check_ran_within("backup ran within 26 h", history, WINDOW, NOW, live=False)
    assert result.status is Status.FAIL
    assert result.detail == ("never completed (window 26 h); newest due run is Failed, scheduled 3.0 h ago; "
                             "once the cause is fixed: `prefect deployment run backup/backup`")
    stale = ScheduleHistory(NOW - 30 * HOUR, "backup/backup", ("Late", NOW - 2 * HOUR))
    assert check_ran_within("b", stale, WINDOW, NOW, live=False).detail.startswith(
        "last completed 30.0 h ago (window 26 h); newest due run is Late")


def test_an_undeployed_job_only_counts_completions() -> None:
    result = check_ran_within("backup ran within 26 h", ScheduleHistory(None), WINDOW, NOW, live=False)
    assert (result.status, result.detail) == (Status.FAIL, "never completed (window 26 h)")


def test_the_no_go_message_lists_every_failed_check_and_nothing_else() -> None:
    verdict = Verdict("dry-run", (passed("redis", "ok"), failed("kill switch off", "trading:kill=1"),
                                  skipped("backup ran within 26 h", "not yet due: ..."),
                                  failed("loops running (leases held)", "not running: executor")))
    assert verdict.failure_message() == ("NO-GO (dry-run): 2 failed check(s): kill switch off: trading:kill=1; "
                                         "loops running (leases held): not running: executor")
    assert "Not applicable or not yet due:\n\n- backup ran within 26 h: not yet due" in verdict.markdown()
    assert Verdict("dry-run", (skipped("backup ran within 26 h", "not yet due"),)).go


def test_ages_are_clamped_at_zero_and_the_skew_is_named() -> None:
    assert age_ms(1000, 400, "Redis") == (600, "")
    assert age_ms(1000, 1278, "Redis") == (0, " (Redis clock 278 ms ahead of this host)")


class _Streams:
    def __init__(self, newest: dict[str, int]) -> None:
        self.newest = newest

    async def xrevrange(self, stream: str, count: int) -> list[tuple[str, dict[str, Any]]]:
        return [(f"{self.newest[stream]}-0", {})]


async def test_stream_ages_are_read_against_the_clock_at_the_read_and_never_negative() -> None:
    client = _Streams({"bitvavo:book": NOW + 278, "bitvavo:ticker24h": NOW - 1500})
    result = await check_streams_fresh(client, ("bitvavo:book", "bitvavo:ticker24h"), 60_000, clock=lambda: NOW)
    assert result.status is Status.PASS
    assert result.detail == "bitvavo:book 0 ms (Redis clock 278 ms ahead of this host); bitvavo:ticker24h 1500 ms"


@pytest.mark.parametrize("live", [False, True])
def test_a_skipped_not_yet_due_check_keeps_a_dry_run_go_but_not_a_live_one(live: bool) -> None:
    check = check_ran_within("backup ran within 26 h", ScheduleHistory(None, "backup/backup"), WINDOW, NOW,
                             live=live)
    assert Verdict("live" if live else "dry-run", (check,)).go is not live
