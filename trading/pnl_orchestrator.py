"""The PnL loop: `orders:executed` -> two ledgers (trading/pnl.py) -> `trading:pnl:<mode>`, the lake, metrics.

- Paper and live are two books: a report with `dry_run` true is booked in the paper ledger
  (`trading:pnl:paper`), any other in the live ledger (`trading:pnl:live`); the guards of a
  mode read only that mode's hash. Both hashes are written even when a mode never traded, so
  each has a fresh `updated_ts` heartbeat.
- The ledgers are a function of `orders:executed`: at start they are rebuilt by replaying the
  whole stream (`rebuild_from_stream`), so the set of booked `fill_id`s survives any restart;
  then the consumer group `pnl` (created at "0") delivers what is pending or new. An entry the
  replay already covered books nothing (its fills are known) and is only acknowledged; a bad
  one still goes to `orders:executed:dead`. A fill repeated in a later report is skipped.
- Each new entry's fills and the whole hash of its mode (DEL + HSET) are written in the
  entry's own MULTI/EXEC with its XACK. A final report also clears its intent from
  `trading:intents:open` in that transaction: the trading core counts an open sell against the
  inventory until its fills are in the ledger, never in between. A sell fill beyond the
  position books only what was held; the rest is a `ledger_anomaly` event (critical) and
  `trader_pnl_anomalies` counts it. Bad input (missing field, not a decimal, a market that is
  not an EUR market, a fill with a non-positive amount) is a `RejectEntry`: dead-lettered with
  the reason, and the loop goes on.
- Marks: every `mark_every_s` the newest top of book of each market held is read from
  `bitvavo:book` (newest first, XREVRANGE, stopping as soon as every market is found, so the
  cost does not grow with the book's update rate) and the hash is rewritten, which also makes
  `updated_ts` a heartbeat. A market without a book entry is marked at its last fill price.
- A snapshot row per mode (column `mode`) goes to the lake channel `pnl` every
  `snapshot_every_s` and at stop.
- `rebuild_from_stream` / `rebuild_from_lake` give the ledgers the live loop holds (docs/pnl.md);
  `python -m trading.pnl_orchestrator rebuild` runs them by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis.asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from trading.backoff import Backoff
from trading.bus import (
    BOOK_SCHEMA,
    KEY_OPEN_INTENTS,
    ORDERS_EXECUTED,
    STREAM_BOOK,
    EntryDecodeError,
    EntryEncodeError,
    as_text,
    decode_entry,
    encode_entry,
    pnl_key,
)
from trading.clock import now_ms
from trading.config import Settings
from trading.consumer import ConsumerMetrics, GroupConsumer, RejectEntry, StreamEntry
from trading.events import Severity, queue_event
from trading.lake import LakeWriteError, LakeWriter, TornTail, channel_rows, utc_day
from trading.lease import Lease, LeaseLostError
from trading.log_sampling import worth_logging
from trading.loop import every, run_guarded
from trading.metrics import LabelCache, MetricsEndpoint
from trading.orders import ExecutionReport, IntentError
from trading.pnl import MARK_LAST_FILL, MODES, Anomaly, ApplyOutcome, LedgerError, Ledgers, mode_of
from trading.redis_conn import async_client, redis_url

log = logging.getLogger(__name__)

LOOP_NAME = "pnl"  # lease, consumer group
LAKE_CHANNEL = "pnl"
EXECUTED_LAKE_CHANNEL = "orders/executed"
DEFAULT_METRICS_PORT = 9604
_REDIS_DOWN = (RedisError, OSError)
# Fields that do not depend on marks: what a rebuild must reproduce exactly.
_LEDGER_TOTALS = ("realized", "realized_fifo", "fees", "realized_today", "fills", "anomalies")
_LEDGER_MARKET_FIELDS = ("position", "avg_cost", "realized", "realized_fifo", "fees", "unbooked")


def parse_report(fields: Mapping[Any, Any]) -> ExecutionReport:
    """An `orders:executed` entry (stream fields, all strings) as a report; `LedgerError` when off-contract."""
    try:
        return ExecutionReport.decode(fields)
    except IntentError as exc:
        raise LedgerError(str(exc)) from None


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


# -- rebuilding ---------------------------------------------------------------------------------


@dataclass
class Replay:
    """The two ledgers rebuilt from recorded reports, and what the replay saw."""

    ledgers: Ledgers = field(default_factory=Ledgers)
    entries: int = 0
    rejected: int = 0  # entries the live loop dead-letters; skipped here the same way
    last_id: str | None = None  # stream replays: the newest entry covered
    anomalies_by_entry: dict[str, tuple[Anomaly, ...]] = field(default_factory=dict)  # stream replays

    def feed(self, fields: Mapping[Any, Any], source: str, *, entry_id: str | None = None) -> None:
        self.entries += 1
        try:
            outcome = self.ledgers.apply(parse_report(fields))
            if outcome.anomalies and entry_id is not None:
                self.anomalies_by_entry[entry_id] = outcome.anomalies
        except LedgerError as exc:
            self.rejected += 1
            if worth_logging(self.rejected):
                log.warning("pnl replay: %s skipped (the live loop dead-letters it): %s", source, exc)


async def rebuild_from_stream(client: redis.asyncio.Redis, *, stream: str = ORDERS_EXECUTED,
                              page: int = 1000) -> Replay:
    """The ledgers of every report in `stream`, oldest first."""
    replay = Replay()
    lower = "-"
    while True:
        entries: Any = await client.xrange(stream, min=lower, max="+", count=page)
        for entry_id, fields in entries:
            replay.feed(fields, f"{stream} {entry_id}", entry_id=as_text(entry_id))
        if entries:
            replay.last_id = as_text(entries[-1][0])
            lower = "(" + replay.last_id
        if len(entries) < page:
            return replay


def rebuild_from_lake(parquet_dir: Path, days: Iterable[date]) -> Replay:
    """The ledgers of the reports the executor recorded in the lake (`orders/executed`) on `days`, in
    order, from the hot JSONL files and the compacted Parquet alike."""
    replay = Replay()

    def torn(tail: TornTail) -> None:  # a writer crashed or is writing now: never half-parse a line
        log.warning("pnl replay: torn last line of %s (%d bytes) not read", tail.path, len(tail.fragment))

    for day in sorted(days):
        for source, row in channel_rows(parquet_dir, day, EXECUTED_LAKE_CHANNEL, on_torn_tail=torn):
            try:
                fields = encode_entry({k: v for k, v in row.items() if v is not None})  # back into stream form
            except EntryEncodeError as exc:
                replay.entries += 1
                replay.rejected += 1
                log.warning("pnl replay: %s skipped: %s", source, exc)
                continue
            replay.feed(fields, source)
    return replay


def ledger_fields(snapshot: Mapping[str, str]) -> dict[str, str]:
    """The mark-independent part of a ledger snapshot: what a rebuild reproduces exactly."""
    def wanted(key: str) -> bool:
        market, _, name = key.rpartition(":")
        return name in _LEDGER_MARKET_FIELDS if market else name in _LEDGER_TOTALS

    return {key: value for key, value in snapshot.items() if wanted(key)}


# -- marks --------------------------------------------------------------------------------------


class BookMarks:
    """The newest mid per market from `bitvavo:book`, read newest first since the previous poll.

    A market not looked for before is searched back through history (at most `max_scan`
    entries), so a restart or a first fill in a market finds its latest book at once.
    """

    def __init__(self, client: redis.asyncio.Redis, *, stream: str = STREAM_BOOK, page: int = 500,
                 max_scan: int = 20_000) -> None:
        self._client: Any = client
        self._stream = stream
        self._page = page
        self._max_scan = max_scan
        self._newest: str | None = None
        self._searched: set[str] = set()
        self.bad_entries = 0

    async def poll(self, markets: Iterable[str]) -> dict[str, Decimal]:
        wanted = set(markets)
        if not wanted:
            return {}
        lower = "-" if self._newest is None or wanted - self._searched else "(" + self._newest
        upper = "+"
        found: dict[str, Decimal] = {}
        scanned = 0
        newest: str | None = None
        while scanned < self._max_scan:
            entries = await self._client.xrevrange(self._stream, max=upper, min=lower, count=self._page)
            if entries and newest is None:
                newest = as_text(entries[0][0])
            for _entry_id, raw in entries:
                market = raw.get("market", "")
                if market in wanted and market not in found:
                    mid = self._mid(raw)
                    if mid is not None:
                        found[market] = mid
            scanned += len(entries)
            if len(entries) < self._page or len(found) == len(wanted):
                break
            upper = "(" + as_text(entries[-1][0])
        self._searched |= wanted
        if newest is not None:
            self._newest = newest
        return found

    def _mid(self, raw: Mapping[Any, Any]) -> Decimal | None:
        try:
            book = decode_entry(raw, BOOK_SCHEMA)
            bid, ask = book["bid"], book["ask"]
        except (EntryDecodeError, KeyError):
            bid = ask = Decimal(0)
        if bid <= 0 or ask < bid:
            self.bad_entries += 1
            return None
        mid: Decimal = (bid + ask) / 2
        return mid


# -- metrics ------------------------------------------------------------------------------------


class PnlMetrics:
    """The `trader_pnl_*` families (docs/pnl.md); every ledger figure is labelled by `mode` (paper, live)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.consumer = ConsumerMetrics("trader_pnl", r)
        self.totals = {name: LabelCache(Gauge(f"trader_pnl_{name}_eur", help_text, ["mode"], registry=r))
                       for name, help_text in (
            ("realized", "Realised PnL, average cost, gross of fees"),
            ("realized_fifo", "Realised PnL, FIFO, gross of fees"),
            ("unrealized", "Unrealised PnL at the marks, average cost"),
            ("fees", "Fees paid (rebates deducted)"),
            ("equity", "realized - fees + unrealized"),
            ("realized_today", "realized - fees of today's fills (UTC day)"),
            ("exposure", "Sum over markets of position x mark"))}
        self.market_exposure = LabelCache(Gauge("trader_pnl_market_exposure_eur", "position x mark",
                                                ["mode", "market"], registry=r))
        self.position = LabelCache(Gauge("trader_pnl_position", "Position (base amount, never below zero)",
                                         ["mode", "market"], registry=r))
        self.mark_from_fill = LabelCache(Gauge("trader_pnl_mark_from_last_fill",
                                               "1 while the market has no book mark and is valued at its last fill",
                                               ["mode", "market"], registry=r))
        self.fills_applied = LabelCache(Counter("trader_pnl_fills_applied", "Fills booked from new reports",
                                                ["mode"], registry=r))
        self.duplicates = Counter("trader_pnl_duplicate_fills", "Fills skipped: fill_id booked before",
                                  registry=r)
        self.anomalies = LabelCache(Counter("trader_pnl_anomalies",
                                            "Sell fills beyond the position (base the bot did not hold), not booked",
                                            ["mode", "market"], registry=r))
        self.ledger_fills = LabelCache(Gauge("trader_pnl_ledger_fills", "Fills in the ledger, replayed ones included",
                                             ["mode"], registry=r))
        self.replayed = Counter("trader_pnl_replayed_entries", "Reports replayed from the stream at start",
                                registry=r)
        self.last_update_age = Gauge("trader_pnl_last_update_age_seconds",
                                     "Seconds since the ledger hashes were written", registry=r)
        self.snapshots = Counter("trader_pnl_snapshots", "Snapshot rows written to the lake", registry=r)
        self.snapshot_errors = Counter("trader_pnl_snapshot_errors", "Lake snapshot writes that failed",
                                       registry=r)
        self.bad_book_entries = Counter("trader_pnl_bad_book_entries", "Book entries unusable as a mark",
                                        registry=r)

    def show(self, mode: str, snapshot: Mapping[str, str], markets: Iterable[str]) -> None:
        for name, gauge in self.totals.items():
            gauge(mode).set(float(Decimal(snapshot[name])))
        for market in markets:
            self.market_exposure(mode, market).set(float(Decimal(snapshot[f"{market}:exposure"])))
            self.position(mode, market).set(float(Decimal(snapshot[f"{market}:position"])))
            self.mark_from_fill(mode, market).set(1 if snapshot[f"{market}:mark_source"] == MARK_LAST_FILL else 0)
            self.anomalies(mode, market)  # the series exists at 0 from the start, so increase() sees the first one
        self.ledger_fills(mode).set(int(snapshot["fills"]))


# -- the loop -----------------------------------------------------------------------------------


class PnlLoop:
    """The two ledgers and everything that writes them out; one per run."""

    def __init__(self, client: redis.asyncio.Redis, consumer: GroupConsumer, metrics: PnlMetrics,
                 lake: LakeWriter, marks: BookMarks) -> None:
        self.client: Any = client
        self.consumer = consumer
        self.metrics = metrics
        self.lake = lake
        self.marks = marks
        self.ledgers = Ledgers()
        self.ready = asyncio.Event()
        self.replayed = Replay()
        self.fills_applied = 0
        self.duplicates = 0
        self.anomalies = 0
        self.last_write_ms = 0
        self._bad_marks_seen = 0
        self._last_entry: tuple[str, ExecutionReport, ApplyOutcome] | None = None
        metrics.last_update_age.set_function(self._update_age_s)

    def _update_age_s(self) -> float:
        return (now_ms() - self.last_write_ms) / 1000 if self.last_write_ms else 0.0

    async def start(self) -> None:
        """Rebuild the ledgers from the stream (retrying while Redis is down), mark them, publish them."""
        backoff = Backoff(base_s=0.1, cap_s=5.0)
        failures = 0
        while True:
            try:
                self.replayed = await rebuild_from_stream(self.client, stream=self.consumer.stream)
                break
            except _REDIS_DOWN as exc:
                failures += 1
                if worth_logging(failures):
                    log.warning("pnl: replay of %s failed (%s); retrying", self.consumer.stream, exc)
                await asyncio.sleep(backoff.next_delay())
        self.ledgers = self.replayed.ledgers
        self.metrics.replayed.inc(self.replayed.entries)
        log.info("pnl: ledgers rebuilt from %d reports of %s (paper %d fills, live %d fills, %d rejected, up to %s)",
                 self.replayed.entries, self.consumer.stream, self.ledgers.paper.fills_applied,
                 self.ledgers.live.fills_applied, self.replayed.rejected, self.replayed.last_id)
        with contextlib.suppress(*_REDIS_DOWN):  # the mark loop retries both
            await self.refresh_marks()
            await self.publish()
        self.ready.set()

    def _replayed(self, entry_id: str) -> bool:
        last = self.replayed.last_id
        return last is not None and _id_key(entry_id) <= _id_key(last)

    async def handle(self, entry: StreamEntry, tx: Pipeline) -> None:
        # A retry of the same entry (its transaction failed) reuses the booking: fills count once.
        if self._last_entry is not None and self._last_entry[0] == entry.entry_id:
            _, report, outcome = self._last_entry
        else:
            try:
                report = parse_report(entry.fields)
                outcome = self.ledgers.apply(report)
            except LedgerError as exc:
                raise RejectEntry(str(exc)) from None
            self._last_entry = (entry.entry_id, report, outcome)
            if not self._replayed(entry.entry_id):
                mode = mode_of(report.dry_run)
                self.fills_applied += outcome.applied
                self.duplicates += outcome.duplicates
                self.metrics.fills_applied(mode).inc(outcome.applied)
                self.metrics.duplicates.inc(outcome.duplicates)
                for anomaly in outcome.anomalies:
                    self._count_anomaly(mode, anomaly)
                if outcome.duplicates:
                    self.consumer.skip_duplicate()
            else:  # its anomalies were booked by the replay, and are evented (so counted) with this ack
                for anomaly in self.replayed.anomalies_by_entry.get(entry.entry_id, ()):
                    self._count_anomaly(mode_of(report.dry_run), anomaly)
        if report.final:  # its fills are in the ledger in this same transaction: the core may count them now
            tx.hdel(KEY_OPEN_INTENTS, report.intent_id)
        mode = mode_of(report.dry_run)
        if self._replayed(entry.entry_id):
            # Booked by the start-up replay but never acknowledged: its anomaly events were not written either
            # (they go in the ack's transaction), so they are written now, once, with the hash its open
            # intent's release must come with (the start-up publish may have failed).
            for anomaly in self.replayed.anomalies_by_entry.get(entry.entry_id, ()):
                _queue_anomaly(tx, mode, report.intent_id, anomaly)
            self._queue_hash(tx, report.dry_run)
            return
        for anomaly in outcome.anomalies:
            _queue_anomaly(tx, mode, report.intent_id, anomaly)
        if outcome.applied:
            self._queue_hash(tx, report.dry_run)

    def _count_anomaly(self, mode: str, anomaly: Anomaly) -> None:
        self.anomalies += 1
        self.metrics.anomalies(mode, anomaly.market).inc()

    def _queue_hash(self, tx: Any, dry_run: bool) -> None:
        now = now_ms()
        ledger = self.ledgers.of(dry_run)
        snapshot = ledger.snapshot(now)
        key = pnl_key(dry_run)
        tx.delete(key)
        tx.hset(key, mapping=snapshot)
        self.last_write_ms = now
        self.metrics.show(mode_of(dry_run), snapshot, ledger.accounts)

    async def publish(self) -> None:
        """Write both hashes now (one MULTI/EXEC)."""
        async with self.client.pipeline(transaction=True) as tx:
            for dry_run in (True, False):
                self._queue_hash(tx, dry_run)
            await tx.execute()

    async def refresh_marks(self) -> None:
        paper, live = self.ledgers.paper, self.ledgers.live
        for market, mid in (await self.marks.poll(set(paper.accounts) | set(live.accounts))).items():
            for ledger in (paper, live):
                if market in ledger.accounts:
                    ledger.mark(market, mid)
        if self.marks.bad_entries != self._bad_marks_seen:
            self.metrics.bad_book_entries.inc(self.marks.bad_entries - self._bad_marks_seen)
            self._bad_marks_seen = self.marks.bad_entries

    async def mark_and_publish(self) -> None:
        await self.refresh_marks()
        await self.publish()

    def snapshot_to_lake(self) -> None:
        now = now_ms()
        rows = [{"ts": now, "mode": mode, **ledger.snapshot(now)} for mode, ledger in self.ledgers.by_mode().items()]
        try:
            self.lake.write_batch(rows)
        except LakeWriteError as exc:  # the lake copy is secondary: the hashes stay current
            self.metrics.snapshot_errors.inc()
            log.warning("pnl: snapshot to the lake failed: %s", exc)
            return
        self.metrics.snapshots.inc(len(rows))

    async def run_marks(self, interval_s: float) -> None:
        await self.ready.wait()
        await every(interval_s, self.mark_and_publish, swallow=_REDIS_DOWN)

    async def run_snapshots(self, interval_s: float) -> None:
        await self.ready.wait()
        while True:
            await asyncio.sleep(interval_s)
            self.snapshot_to_lake()

    async def run_consumer(self) -> None:
        await self.start()
        await self.consumer.run(self.handle)

    def summary(self) -> dict[str, Any]:
        stats = self.consumer.stats
        return {"replayed_entries": self.replayed.entries, "replay_rejected": self.replayed.rejected,
                "fills_applied": self.fills_applied, "duplicate_fills": self.duplicates,
                "anomalies": self.anomalies,
                "ledger_fills": {mode: ledger.fills_applied for mode, ledger in self.ledgers.by_mode().items()},
                "consumed": stats.consumed, "dead_lettered": stats.dead_lettered, "reclaimed": stats.reclaimed,
                "snapshots": self.lake.stats.rows_written,
                "markets": {mode: sorted(ledger.accounts) for mode, ledger in self.ledgers.by_mode().items()}}


def _queue_anomaly(tx: Any, mode: str, intent_id: str, anomaly: Anomaly) -> None:
    queue_event(tx, "ledger_anomaly", Severity.CRITICAL, market=anomaly.market, intent_id=intent_id,
                detail={"mode": mode, **anomaly.to_json(),
                        "reason": f"a {mode} sell filled beyond the {mode} ledger's position: the excess is not "
                                  f"booked (spot: the bot cannot be short); see docs/pnl.md"}, ts=anomaly.ts)


async def run_pnl(settings: Settings, *, redis_url: str, duration_s: float | None = None,
                  metrics_port: int = DEFAULT_METRICS_PORT, lease_wait_s: float = 0.0,
                  snapshot_every_s: float = 60.0, mark_every_s: float = 1.0,
                  gauge_every_s: float = 5.0, block_ms: int = 500) -> dict[str, Any]:
    """Run the PnL loop under its lease for `duration_s` (None: until cancelled); returns a summary."""
    for name, value in (("snapshot_every_s", snapshot_every_s), ("mark_every_s", mark_every_s),
                        ("gauge_every_s", gauge_every_s)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    client = async_client(redis_url)
    metrics = PnlMetrics()
    endpoint = MetricsEndpoint(metrics.registry, settings.metrics_host, metrics_port)
    consumer = GroupConsumer(client, ORDERS_EXECUTED, LOOP_NAME, metrics=metrics.consumer, start_id="0",
                             block_ms=block_ms)
    loop = PnlLoop(client, consumer, metrics, LakeWriter(settings.parquet_dir, LAKE_CHANNEL), BookMarks(client))

    def work(_lease: Lease) -> tuple[Coroutine[Any, Any, None], ...]:
        # Only the lease holder binds the port: a second instance fails on the lease, naming its holder.
        endpoint.start()
        log.info("pnl: lease held; metrics on %s", endpoint.url)
        return (loop.run_consumer(), loop.run_marks(mark_every_s), loop.run_snapshots(snapshot_every_s),
                every(gauge_every_s, consumer.refresh_gauges, swallow=_REDIS_DOWN))

    lease_lost = False
    try:
        held = await run_guarded(LOOP_NAME, client, work, duration_s=duration_s, lease_wait_s=lease_wait_s)
    except LeaseLostError:
        lease_lost = True  # another instance may own the ledger hashes now: write nothing more
        raise
    finally:
        try:
            if loop.ready.is_set() and not lease_lost:
                with contextlib.suppress(*_REDIS_DOWN, TimeoutError):
                    async with asyncio.timeout(2):  # well inside the loops' 10 s stop bound, Redis frozen or not
                        await loop.mark_and_publish()
                loop.snapshot_to_lake()
        finally:
            loop.lake.close()
            endpoint.stop()
            await client.aclose()
    summary = loop.summary()
    summary.update(fencing_token=held.fencing_token, metrics_url=endpoint.url,
                   pnl={mode: {key: value for key, value in ledger.snapshot(now_ms()).items() if ":" not in key}
                        for mode, ledger in loop.ledgers.by_mode().items()})
    log.info("pnl: stopped: %s", summary)
    return summary



# -- rebuild by hand ----------------------------------------------------------------------------


async def _rebuild(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    with redis_url(settings) as url:
        client = async_client(url)
        try:
            held = {mode: {as_text(k): as_text(v) for k, v in (await client.hgetall(pnl_key(dry_run))).items()}
                    for mode, dry_run in zip(MODES, (True, False), strict=True)}
            if args.source == "stream":
                replay = await rebuild_from_stream(client)
            else:
                today = utc_day(now_ms())
                days = [date.fromisoformat(d) for d in args.day] or [today - timedelta(days=n)
                                                                     for n in range(args.days)]
                replay = rebuild_from_lake(settings.parquet_dir, days)
        finally:
            await client.aclose()
    rebuilt: dict[str, dict[str, str]] = {}
    differences: dict[str, dict[str, dict[str, str | None]]] = {}
    for mode, ledger in replay.ledgers.by_mode().items():
        # Snapshot time = the held hash's, so realized_today refers to the same UTC day.
        current = held[mode]
        at = int(current["updated_ts"]) if "updated_ts" in current else now_ms()
        rebuilt[mode] = mine = ledger_fields(ledger.snapshot(at))
        theirs = ledger_fields(current)
        differences[mode] = {key: {"rebuilt": mine.get(key), "held": theirs.get(key)}
                             for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)}
    print(json.dumps({"source": args.source, "entries": replay.entries, "rejected": replay.rejected,
                      "ledgers": rebuilt}, indent=2))
    if not args.compare:
        return 0
    print(json.dumps({"differences": differences}, indent=2))
    return 1 if any(differences.values()) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trading.pnl_orchestrator",
                                     description="Rebuild the paper and live ledgers from orders:executed or the lake.")
    commands = parser.add_subparsers(dest="command", required=True)
    rebuild = commands.add_parser("rebuild", help="rebuild both ledgers and print their mark-independent fields")
    rebuild.add_argument("--source", choices=("stream", "lake"), default="stream")
    rebuild.add_argument("--day", action="append", default=[], help="lake day YYYY-MM-DD (repeatable)")
    rebuild.add_argument("--days", type=int, default=1, help="lake: the last N UTC days, today included")
    rebuild.add_argument("--compare", action="store_true",
                         help="compare with the trading:pnl:paper and :live hashes; exit 1 when they differ")
    args = parser.parse_args(argv)
    return asyncio.run(_rebuild(args))


if __name__ == "__main__":
    sys.exit(main())
