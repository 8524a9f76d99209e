"""The go-live checklist as code: each check returns a status and a detail an operator can act on.

Checks that need Prefect (automations, workers, when maintenance last ran) take what the flow
read from the API as plain values, so this module stays free of Prefect and every check can be
tested on its own. `Verdict.go` is True only when no check failed; a skipped check (one that
does not apply to the mode, such as credentials in a sim dry-run) does not fail the verdict.

"Not yet due" is not "failed": a scheduled job (compaction, rotation, backup) whose first run has
not come round since the stack was deployed has proven nothing, but nothing went wrong either.
It is a SKIP in dry-run (a fresh stack can be trialled at once) and a FAIL live (live trading
needs the proof); either way the detail names the command that clears it now. Ages are never
negative: an entry stamped ahead of this host's clock is 0 ms old, and the skew is named.
"""

from __future__ import annotations

import asyncio
import compileall
import os
import shutil
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from trading.bus import (
    KEY_KILL,
    KEY_KILL_DRILL,
    KEY_PNL_LIVE,
    ORDERS_SHADOW,
    TRADING_EVENTS,
    as_text,
    decode_entry,
    encode_entry,
)
from trading.clock import now_ms
from trading.lake import utc_day
from trading.lease import LEASE_KEY_PREFIX
from trading.redis_conn import memory_limit
from trading.risk import PNL_MAX_AGE_MS

MEMORY_LIMIT_RATIO = Decimal("0.7")


class Status(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str

    def row(self) -> dict[str, str]:
        return {"check": self.name, "status": self.status.value.upper(), "detail": self.detail}


@dataclass(frozen=True)
class Verdict:
    mode: str
    checks: tuple[CheckResult, ...]

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status is Status.FAIL]

    @property
    def go(self) -> bool:
        return not self.failed

    def failure_message(self) -> str:
        """One readable line naming every failed check, for the run's state message."""
        return (f"NO-GO ({self.mode}): {len(self.failed)} failed check(s): "
                + "; ".join(f"{c.name}: {c.detail}" for c in self.failed))

    def markdown(self) -> str:
        head = f"## {'✅ GO' if self.go else '❌ NO-GO'} ({self.mode})\n\n"
        if self.go:
            body = f"All {len(self.checks)} checks passed or do not apply to {self.mode}.\n"
        else:
            body = "Failed checks:\n\n" + "".join(f"- **{c.name}**: {c.detail}\n" for c in self.failed)
        skipped = [c for c in self.checks if c.status is Status.SKIP]
        if skipped:
            body += "\nNot applicable or not yet due:\n\n" + "".join(f"- {c.name}: {c.detail}\n" for c in skipped)
        return head + body


def passed(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Status.PASS, detail)


def failed(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Status.FAIL, detail)


def skipped(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Status.SKIP, detail)


def not_yet_due(name: str, why: str, clear: str, *, live: bool) -> CheckResult:
    """SKIP in dry-run, FAIL live (see the module docstring); `clear` is the command that proves it now."""
    detail = f"not yet due: {why}; to clear it now: {clear}"
    return failed(name, detail) if live else skipped(name, detail)


def age_ms(now: int, stamped_ms: int, clock: str) -> tuple[int, str]:
    """The age clamped at 0, and a note naming the skew when `clock` stamped it ahead of this host."""
    age = now - stamped_ms
    if age >= 0:
        return age, ""
    return 0, f" ({clock} clock {-age} ms ahead of this host)"


async def guarded(name: str, check: Awaitable[CheckResult], timeout_s: float = 30.0) -> CheckResult:
    """A check that raises or hangs is a failed check, named, never a crashed checklist."""
    try:
        async with asyncio.timeout(timeout_s):
            return await check
    except TimeoutError:
        return failed(name, f"no answer within {timeout_s:.0f}s")
    except Exception as exc:  # the checklist reports every failure; it must not stop at the first
        return failed(name, f"{type(exc).__name__}: {exc}")


# -- code -------------------------------------------------------------------------------------

def check_compiles(root: Path, packages: Sequence[str]) -> CheckResult:
    name = "code compiles"
    broken = [pkg for pkg in packages
              if (root / pkg).is_dir() and not compileall.compile_dir(str(root / pkg), quiet=2, force=False)]
    missing = [pkg for pkg in packages if not (root / pkg).is_dir()]
    if broken or missing:
        return failed(name, "; ".join([*(f"{p}: does not compile" for p in broken),
                                       *(f"{p}: missing" for p in missing)]))
    return passed(name, f"python -m compileall: {', '.join(packages)}")


# -- redis ------------------------------------------------------------------------------------

async def check_redis(client: Any) -> CheckResult:
    name = "redis reachable, memory below 70%"
    info = await client.info("memory")
    used = int(info["used_memory"])
    limit, source = memory_limit(info)
    if limit <= 0:
        return failed(name, "Redis reports neither maxmemory nor total_system_memory")
    ratio = Decimal(used) / Decimal(limit)
    detail = f"used_memory {used / 2**20:.1f} MiB = {ratio * 100:.1f}% of {source} ({limit / 2**20:.0f} MiB)"
    return passed(name, detail) if ratio < MEMORY_LIMIT_RATIO else failed(name, detail)


async def check_streams_fresh(client: Any, streams: Iterable[str], max_age_ms: int,
                              clock: Callable[[], int] = now_ms) -> CheckResult:
    """The newest entry's id is Redis's clock at XADD; it is compared with this host's clock read
    right after it, so an age below 0 can only be the skew between the two, which is named."""
    name = "ingest streams fresh"
    stale: list[str] = []
    ages: list[str] = []
    for stream in streams:
        newest = await client.xrevrange(stream, count=1)
        if not newest:
            stale.append(f"{stream}: empty")
            continue
        entry_id = newest[0][0]
        age, skew = age_ms(clock(), int(as_text(entry_id).split("-")[0]), "Redis")
        ages.append(f"{stream} {age} ms{skew}")
        if age > max_age_ms:
            stale.append(f"{stream}: newest entry {age / 1000:.1f}s old (limit {max_age_ms / 1000:.0f}s)")
    return failed(name, "; ".join(stale)) if stale else passed(name, "; ".join(ages))


async def check_loops_running(client: Any, loops: Iterable[str]) -> CheckResult:
    """Every loop holds its Redis lease: the lease, not Prefect's state, says it is alive."""
    name = "loops running (leases held)"
    missing = [loop for loop in loops if not await client.exists(LEASE_KEY_PREFIX + loop)]
    if missing:
        return failed(name, f"not running: {', '.join(missing)} (no lease:<loop> key)")
    return passed(name, "all hold their lease")


async def check_kill_switch_off(client: Any) -> CheckResult:
    name = "kill switch off"
    if (await client.get(KEY_KILL)) in ("1", b"1"):
        return failed(name, "trading:kill=1: every order is blocked (run the kill-switch deployment with "
                            "enabled=false once the cause is understood)")
    return passed(name, "trading:kill is not set")


async def check_live_ledger(client: Any, now: int, *, live: bool, max_age_ms: int = PNL_MAX_AGE_MS) -> CheckResult:
    """The live book as the live guards will see it: positions, exposure, today's PnL, anomalies.

    Live: a missing or stale `trading:pnl:live` (the PnL loop is not running) fails, since every
    live order would be refused on it. Dry-run: shown, never failing. Anomalies are shown, not
    failed: they are history (docs/runbooks.md#ledger-anomaly), not a state that blocks trading.
    """
    name = "live ledger"
    raw = await client.hgetall(KEY_PNL_LIVE)
    book = {as_text(k): as_text(v) for k, v in raw.items()}
    if not book:
        why = f"{KEY_PNL_LIVE} is not written (is the PnL loop running?)"
        return failed(name, why) if live else skipped(name, why)
    updated = book.get("updated_ts", "")
    age_ms = now - int(updated) if updated.isdigit() else None
    if age_ms is None or age_ms > max_age_ms:
        why = (f"{KEY_PNL_LIVE} written {max(0, age_ms) / 1000:.0f}s ago (limit {max_age_ms / 1000:.0f}s): "
               "the PnL loop is not running" if age_ms is not None else f"updated_ts {updated[:40]!r} unreadable")
        return failed(name, why) if live else skipped(name, why)
    held = sorted((key.removesuffix(":position"), value) for key, value in book.items()
                  if key.endswith(":position") and value not in ("0", ""))
    positions = ", ".join(f"{market} {amount}" for market, amount in held) or "flat"
    detail = (f"positions: {positions}; exposure {book.get('exposure', '0')} EUR; realised today "
              f"{book.get('realized_today', '0')} EUR; equity {book.get('equity', '0')} EUR; "
              f"fills {book.get('fills', '0')}")
    anomalies = book.get("anomalies", "0")
    if anomalies not in ("0", ""):
        detail += f"; {anomalies} ledger anomalies (docs/runbooks.md#ledger-anomaly)"
    return passed(name, detail)


async def check_signal_engine(client: Any, signal_stream: str, book_stream: str, max_lag: int) -> CheckResult:
    """The engine's group on the book stream keeps up; signals exist (a quiet market may have none recently)."""
    name = "signal engine producing"
    groups = {as_text(g["name"]): g for g in await client.xinfo_groups(book_stream)} if await client.exists(
        book_stream) else {}
    group = groups.get("signal-engine")
    if group is None:
        return failed(name, f"no consumer group signal-engine on {book_stream}: the engine never ran")
    last = as_text(group["last-delivered-id"])
    lag = len(await client.xrange(book_stream, min="(" + last, max="+", count=max_lag + 1))
    if lag > max_lag:
        return failed(name, f"{lag}+ book entries not yet read by the signal engine (limit {max_lag})")
    count = await client.xlen(signal_stream)
    return passed(name, f"reading {book_stream} (lag {lag}); {count} entries in {signal_stream}")


async def check_dry_run_intents(client: Any, dry_run: bool, sample: int = 200) -> CheckResult:
    """The recent intents carry the mode the stack is configured for (a dry-run stack sends no live intent)."""
    name = "trading core intents match the mode"
    recent = await client.xrevrange(ORDERS_SHADOW, count=sample)
    wrong = [e for _id, e in recent if (e.get("dry_run") == "true") != dry_run]
    if wrong:
        return failed(name, f"{len(wrong)} of the last {len(recent)} intents have dry_run={not dry_run}")
    return passed(name, f"{len(recent)} recent intents, all dry_run={str(dry_run).lower()}")


DRILL_STRATEGY = "preflight-drill"
# Switch off only if the drill still owns the switch: an operator (or flatten) who set it meanwhile cleared
# the drill's marker, and their switch stays on.
_TAKE_FOR_DRILL_LUA = """
if redis.call('GET', KEYS[1]) == '1' then return 0 end
redis.call('SET', KEYS[1], '1')
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""
_RESTORE_AFTER_DRILL_LUA = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
"""


async def kill_switch_drill(client: Any, signal_stream: str, *, timeout_s: float = 10.0,
                            poll_s: float = 0.05) -> CheckResult:
    """Switch on, send a test signal, prove the trading core blocked it, switch back to how it was.

    The test signal is a real signal on the stream (strategy `preflight-drill`, a tiny size at a
    reference price), so the path under test is the production one. If the switch was already on
    the drill leaves it on.
    """
    name = "kill-switch drill"
    signal_id = f"preflight-drill-{uuid.uuid4()}"
    start = now_ms()
    start_id = f"{start}-0"
    # Atomically: an operator's switch that is on stays theirs; otherwise the drill takes it, marked as its own.
    was_on = not await client.eval(_TAKE_FOR_DRILL_LUA, 2, KEY_KILL, KEY_KILL_DRILL, signal_id)
    try:
        await client.xadd(signal_stream, encode_entry({
            "ts": start, "signal_id": signal_id, "market": "BTC-EUR", "side": "buy", "strength": Decimal("0"),
            "reason": "preflight kill-switch drill", "ref_price": Decimal("1"), "spread_bps": Decimal("0"),
            "volatility": Decimal("0"), "strategy": DRILL_STRATEGY}))
        deadline = time.monotonic() + timeout_s
        blocked = False
        while time.monotonic() < deadline and not blocked:
            await asyncio.sleep(poll_s)
            for _id, raw in await client.xrange(TRADING_EVENTS, min=start_id, max="+"):
                event = decode_entry(raw)
                if event.get("type") == "kill_switch" and signal_id in event.get("detail", ""):
                    blocked = True
        leaked = [e for _id, e in await client.xrange(ORDERS_SHADOW, min=start_id, max="+")
                  if e.get("signal_id") == signal_id]
    finally:
        if not was_on:
            await client.eval(_RESTORE_AFTER_DRILL_LUA, 2, KEY_KILL, KEY_KILL_DRILL, signal_id)
    if leaked:
        return failed(name, f"the test signal became an intent while the kill switch was on: {leaked[0]}")
    if not blocked:
        return failed(name, f"no kill_switch event for the test signal within {timeout_s:.0f}s "
                            "(is the trading core running?)")
    return passed(name, f"test signal blocked in {now_ms() - start} ms; switch restored to "
                        f"{'on' if was_on else 'off'}")


# -- metrics ----------------------------------------------------------------------------------

def scrape_families(url: str, timeout_s: float = 5.0) -> set[str]:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    return {family.name for family in text_string_to_metric_families(text)}


async def check_metrics_endpoints(endpoints: Mapping[str, tuple[str, Sequence[str]]],
                                  scrape: Callable[[str], set[str]] = scrape_families) -> CheckResult:
    """Each loop's endpoint answers and exposes its expected families (name -> (url, families))."""
    name = "metrics endpoints"
    problems: list[str] = []
    for loop, (url, families) in endpoints.items():
        try:
            found = await asyncio.to_thread(scrape, url)
        except OSError as exc:
            problems.append(f"{loop} ({url}): {exc}")
            continue
        missing = [f for f in families if f not in found]
        if missing:
            problems.append(f"{loop} ({url}): missing {', '.join(missing)}")
    if problems:
        return failed(name, "; ".join(problems))
    return passed(name, f"{len(endpoints)} endpoints answer with their families")


# -- lake -------------------------------------------------------------------------------------

def check_lake(parquet_dir: Path, *, min_free_bytes: int, max_quiet_s: float, now: int) -> CheckResult:
    name = "lake writable, space, today growing"
    try:
        parquet_dir.mkdir(parents=True, exist_ok=True)
        probe = parquet_dir / f".preflight-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return failed(name, f"{parquet_dir} is not writable: {exc.strerror}")
    free = shutil.disk_usage(parquet_dir).free
    if free < min_free_bytes:
        return failed(name, f"{free / 2**30:.1f} GiB free under {parquet_dir}, need {min_free_bytes / 2**30:.1f}")
    today = parquet_dir / utc_day(now).isoformat()
    newest = max((p.stat().st_mtime for p in today.rglob("*.jsonl")), default=None) if today.is_dir() else None
    if newest is None:
        return failed(name, f"no hot files in today's partition {today}")
    quiet = max(0.0, now / 1000 - newest)  # a file written after `now` was read is 0 s old
    if quiet > max_quiet_s:
        return failed(name, f"today's partition has not grown for {quiet:.0f}s (limit {max_quiet_s:.0f}s)")
    return passed(name, f"{free / 2**30:.1f} GiB free; today's partition written {quiet:.0f}s ago")


@dataclass(frozen=True)
class ScheduleHistory:
    """What Prefect knows of a scheduled job's runs (read by the flow).

    `deployment` ("backup/backup") is None when the flow is not deployed (then only completions
    count); `due_run` is the state name and scheduled time of the newest of its runs that has come
    due, None when none has since the deployment was created.
    """

    last_completed_ms: int | None
    deployment: str | None = None
    due_run: tuple[str, int] | None = None

    def completed_within(self, window_ms: int, now: int) -> bool:
        return self.last_completed_ms is not None and now - self.last_completed_ms <= window_ms

    def not_yet_due(self, window_ms: int, now: int) -> bool:
        return self.deployment is not None and self.due_run is None and not self.completed_within(window_ms, now)


def check_ran_within(name: str, history: ScheduleHistory, window_ms: int, now: int, *, live: bool) -> CheckResult:
    """PASS when a run completed within the window; not yet due when no scheduled run has come due
    since the deployment was created; otherwise FAIL, naming the newest due run's state."""
    last = history.last_completed_ms
    done = "never completed" if last is None else f"last completed {max(0, now - last) / 3_600_000:.1f} h ago"
    if history.completed_within(window_ms, now):
        return passed(name, done)
    run = f"prefect deployment run {history.deployment}"
    if history.not_yet_due(window_ms, now):
        return not_yet_due(name, f"{done}, and no scheduled run has come due since the stack was deployed",
                           f"`{run}`", live=live)
    why = f"{done} (window {window_ms / 3_600_000:.0f} h)"
    if history.due_run is not None:
        state, scheduled = history.due_run
        why += f"; newest due run is {state}, scheduled {max(0, now - scheduled) / 3_600_000:.1f} h ago"
    if history.deployment is not None:
        why += f"; once the cause is fixed: `{run}`"
    return failed(name, why)


# -- prefect (values read by the flow) --------------------------------------------------------

def check_orchestration(automations: Iterable[str], required: Iterable[str], online_workers: int) -> CheckResult:
    name = "automations and a worker"
    missing = sorted(set(required) - set(automations))
    problems = [f"automation missing: {m}" for m in missing]
    if online_workers < 1:
        problems.append("no worker online in pool local")
    if problems:
        return failed(name, "; ".join(problems))
    return passed(name, f"{online_workers} worker(s) online; automations present")


# -- exchange ---------------------------------------------------------------------------------

def check_credentials(has_credentials: bool, can_withdraw: Callable[[], bool], live: bool) -> CheckResult:
    name = "credentials present, no withdrawal right"
    if not has_credentials:
        if live:
            return failed(name, "no API key configured (bitvavo-credentials block or BITVAVO_API_KEY/SECRET)")
        return skipped(name, "no credentials configured: sim/dry-run needs none")
    if can_withdraw():
        return failed(name, "the API key may WITHDRAW funds: create a trade-only key")
    return passed(name, "key present; withdrawal refused with 312")


def check_live_mode(dry_run: bool, live: bool) -> CheckResult:
    name = "mode"
    if not live:
        return passed(name, f"dry-run checklist (DRY_RUN={str(dry_run).lower()})")
    if dry_run:
        return failed(name, "live checklist but DRY_RUN=true: set DRY_RUN=false on the loops' deployments")
    return passed(name, "DRY_RUN=false")

