"""Trading pipeline latency, book update -> intent -> paper execution, each loop its own process.

From a book update entering `bitvavo:book` to its intent in `orders:shadow` and to its paper
execution in `orders:executed`: p50/p90/p99/max, Redis on loopback.

Each loop runs as in production, in its own OS process, through its real entry point:
`run_signal_engine` (min_interval_ms=0), `run_trading_core` (guards on, limits wide open:
MARKET_COOLDOWN_MS=0, huge MAX_*), `run_executor` with `PaperVenue.from_settings` (dry-run; its
book comes over the WebSocket of a `python -m trading.sim` subprocess, balances large). This
process plays ingest: it XADDs synthetic `bitvavo:book` entries at a steady rate, alternating
BTC-EUR and ETH-EUR, each top of book being the simulator's current one (polled every second)
shifted up or down by `--offset-bps`, alternately per market. So once a market's window is full
every update is `--offset-bps` from the window mean: the baseline strategy signals on each one,
and the core's IOC limit (far touch + 10 bps slippage) fills against the simulator's real book.

Measured: `time.time_ns()` right before each book XADD; an observer process XREADs (BLOCK) the
signal stream, `orders:shadow` and `orders:executed` and stamps each entry's arrival with
`time.time_ns()`. Ids are predictable (`signal_id_for(strategy, market, nonce)`,
`intent_id_for(signal_id)`), so each arrival is matched to its book update. The observer's own
wake-up and read time is inside every figure: the figures are conservative.

Baseline, in the same run against the same Redis, measured the same way: a chain of three
minimal consumers, each its own process (XREADGROUP from a stream, then XADD to the next stream
and XACK in one MULTI/EXEC, as every loop acks its effect), fed at the same rate. 1, 2 and 3 raw
hops are printed; the pipeline's book->intent (two loops) is compared with 2 raw hops and
book->execution (three loops) with 3 raw hops: the ratio says what the loops add over the bus.

    python -m bench.pipeline_latency                        # the issue's run: 10,000 signals at 100/s
    python -m bench.pipeline_latency --signals 2000 --rate 200
    python -m bench.pipeline_latency --signals 3000 --profile   # + cProfile of each loop process

The rate must stay below what the slowest loop sustains (the trading core: three sequential Redis
round trips per signal), or the figures measure a queue: the largest backlog is printed, and
SATURATED when it exceeds a quarter second of feed. Not in the path, so not run: ingest (this
process stands in for it), the PnL loop, Prefect (the loops' `run_*` functions are what the flows
call). CPU shares and the load average are printed because other work on the machine is in every
figure.

Redis: REDIS_URL when set (its DB, or `--redis-db N`; it must be empty, and is flushed at the end),
else an embedded redis-server that lives for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import math
import os
import platform
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import ResponseError

from bench.ingest_pipeline import process_cpu_s
from trading.bus import ORDERS_EXECUTED, ORDERS_SHADOW, STREAM_BOOK, encode_entry
from trading.clock import now_ms
from trading.config import Settings, mask_url_password
from trading.decimals import DecimalParseError, parse_decimal
from trading.exchange.market_rules import rules_from_markets
from trading.exchange.rest import BitvavoRest
from trading.lease import LEASE_KEY_PREFIX
from trading.orders import intent_id_for
from trading.processes import free_port, stop_process
from trading.redis_conn import async_client, redis_url, sync_client
from trading.signals import BPS, BPS_QUANTUM, SignalParams, signal_id_for

ROOT = Path(__file__).resolve().parents[1]
MARKETS = ("BTC-EUR", "ETH-EUR")
STRATEGY = "baseline"
HOPS = 3
HOP_STREAMS = tuple(f"bench:hop:{k}" for k in range(HOPS + 1))  # hop k reads stream k-1, writes stream k
LOOPS = ("signal-engine", "trading-core", "executor")
# Everything the guards check stays far away: the bench measures latency, not the risk limits.
PAPER_BALANCES = {"EUR": Decimal("1000000000"), "BTC": Decimal("10000"), "ETH": Decimal("100000")}
BENCH_ENV = {
    "DRY_RUN": "true", "INGEST_MARKETS": ",".join(MARKETS), "MARKET_COOLDOWN_MS": "0",
    "MAX_NOTIONAL_PER_ORDER_EUR": "1000000000", "MAX_EXPOSURE_PER_MARKET_EUR": "1000000000000",
    "MAX_EXPOSURE_TOTAL_EUR": "1000000000000", "MAX_OPEN_INTENTS": "1000000", "MAX_DAILY_LOSS_EUR": "1000000000",
    "SIGNAL_MAX_SPREAD_BPS": "25", "SIGNAL_MIN_VOLATILITY_BPS": "1", "SIGNAL_WINDOW": "30",
    "ORDER_NOTIONAL_EUR": "50", "STALE_BOOK_MS": "5000", "METRICS_HOST": "127.0.0.1",
}
# Settings the machine's environment must not change here (or that no bench process should see).
DROPPED_ENV = ("SIGNAL_STREAM", "STREAM_MAXLEN", "BITVAVO_API_KEY", "BITVAVO_API_SECRET", "BITVAVO_OPERATOR_ID")
STARTUP_TIMEOUT_S = 90.0
DRAIN_TIMEOUT_S = 120.0
CENTER_POLL_S = 1.0
DEFAULT_RATE = 100.0  # the trading core falls behind in bursts at 200/s on the 2 shared cores this was written on
BEHIND_S = 0.25  # a backlog of this much feed time: the consumers did not keep up with the rate



def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def max_backlog(sent_ns: Iterable[int], arrived_ns: Iterable[int]) -> int:
    """The most entries ever sent and not yet arrived: ~1 when the consumers keep up, grows when they fall behind."""
    level = peak = 0
    for _ns, step in sorted([(ns, 1) for ns in sent_ns] + [(ns, -1) for ns in arrived_ns]):
        level += step
        peak = max(peak, level)
    return peak


# -- the child processes -------------------------------------------------------------------------


def _stop_when_parent_says(on_stop: Callable[[], object]) -> None:
    """`on_stop` once stdin reaches EOF: the parent closed it (or died). Never outlive the bench."""

    def wait() -> None:
        sys.stdin.buffer.read()
        on_stop()

    threading.Thread(target=wait, daemon=True, name="parent-watch").start()


def _cancel_when_told(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the running task on SIGTERM or when the parent closes stdin, as a Prefect cancel would."""
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    _stop_when_parent_says(lambda: loop.call_soon_threadsafe(task.cancel))


async def _run_loop(role: str, settings: Settings, metrics_port: int) -> None:
    """One production loop, through its `run_*` entry point, until the parent says stop."""
    # Imported here: the hop and observer processes, and the parent, need none of the loops.
    from trading.execution.executor import run_executor
    from trading.execution.paper import PaperVenue
    from trading.signal_engine import run_signal_engine
    from trading.trading_core import run_trading_core

    _cancel_when_told(asyncio.get_running_loop())
    url = settings.redis_url
    assert url is not None
    with contextlib.suppress(asyncio.CancelledError):
        if role == "signal-engine":
            await run_signal_engine(settings, redis_url=url, metrics_port=metrics_port,
                                    params=SignalParams.from_settings(settings, min_interval_ms=0))
        elif role == "trading-core":
            await run_trading_core(settings, redis_url=url, metrics_port=metrics_port)
        else:
            venue = PaperVenue.from_settings(settings, settings.markets_or_default(), balances=PAPER_BALANCES)
            await run_executor(settings, redis_url=url, venue=venue, metrics_port=metrics_port)


def loop_main(args: argparse.Namespace) -> None:
    settings = Settings.from_env()
    profiler = cProfile.Profile() if args.profile_out else None
    if profiler is not None:
        profiler.enable()
    try:
        asyncio.run(_run_loop(args.role, settings, args.metrics_port))
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile_out)


async def _hop(url: str, source: str, target: str, maxlen: int) -> None:
    """The raw bus, one hop: XREADGROUP a batch, then per entry XADD onward + XACK in one MULTI/EXEC."""
    client: Any = async_client(url)
    group = f"hop:{target}"
    with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
        await client.xgroup_create(source, group, id="0", mkstream=True)
    try:
        while True:
            reply = await client.xreadgroup(group, "hop", {source: ">"}, count=100, block=500)
            for _stream, items in reply or ():
                for entry_id, fields in items:
                    async with client.pipeline(transaction=True) as tx:
                        tx.xadd(target, fields, maxlen=maxlen, approximate=True)
                        tx.xack(source, group, entry_id)
                        await tx.execute()
    finally:
        await client.aclose()


def hop_main(args: argparse.Namespace) -> None:
    settings = Settings.from_env()
    url = settings.redis_url
    assert url is not None

    async def run() -> None:
        _cancel_when_told(asyncio.get_running_loop())
        with contextlib.suppress(asyncio.CancelledError):
            await _hop(url, args.hop_source, args.hop_target, settings.stream_maxlen)

    asyncio.run(run())


def _entry_key(fields: Mapping[str, str]) -> str:
    """What an arrival is matched on: intent_id (shadow, executed), signal_id (signals), market|nonce (hops)."""
    for name in ("intent_id", "signal_id"):
        if name in fields:
            return fields[name]
    return f"{fields.get('market')}|{fields.get('nonce')}"


def observer_main(args: argparse.Namespace) -> None:
    """Stamp the arrival of every entry of the watched streams; write them to `--out` when told to stop."""
    settings = Settings.from_env()
    assert settings.redis_url is not None
    streams: list[str] = args.streams.split(",")
    client: Any = sync_client(settings.redis_url)
    last = dict.fromkeys(streams, "0-0")  # a fresh DB: every entry from the first
    arrivals: dict[str, list[tuple[str, str, int]]] = {s: [] for s in streams}
    stop = threading.Event()
    _stop_when_parent_says(stop.set)
    client.ping()
    print("READY", flush=True)

    def read(block: int | None) -> int:
        reply = client.xread(last, count=1000, block=block)
        arrived = time.time_ns()
        count = 0
        for stream, items in reply or ():
            for entry_id, fields in items:
                arrivals[stream].append((_entry_key(fields), fields.get("status", ""), arrived))
                last[stream] = entry_id
                count += 1
        return count

    while not stop.is_set():
        read(100)
    while read(None):  # what arrived since the last read
        pass
    Path(args.out).write_bytes(orjson.dumps(arrivals))
    client.close()


# -- the parent: processes ------------------------------------------------------------------------


class Child:
    """A subprocess of this bench: stdin is its stop signal (closed = stop), stderr goes to a file."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], workdir: Path,
                 *, stdout: bool = False) -> None:
        self.name = name
        self.stderr_path = workdir / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process: subprocess.Popen[bytes] = subprocess.Popen(
            list(argv), cwd=ROOT, env=dict(env), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL, stderr=self._stderr)

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.process.returncode}:\n{self.stderr_tail()}")

    def stderr_tail(self, chars: int = 3000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def ask_to_stop(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(OSError):
                self.process.stdin.close()

    def wait(self, timeout_s: float) -> bool:
        try:
            self.process.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self) -> None:
        self.ask_to_stop()
        if not self.wait(10.0):
            stop_process(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()


def _bench_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "bench.pipeline_latency", *extra]


@dataclass
class Simulator:
    process: subprocess.Popen[str]
    rest_url: str
    ws_url: str


@contextlib.contextmanager
def running_simulator(workdir: Path) -> Iterator[Simulator]:
    """`python -m trading.sim --port 0` for the two markets; its URLs from its first lines; stopped by PID."""
    with open(workdir / "simulator.stderr", "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "trading.sim", "--port", "0", "--markets", ",".join(MARKETS)],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            assert process.stdout is not None
            urls: dict[str, str] = {}
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while len(urls) < 2:
                line = process.stdout.readline()
                if not line and (process.poll() is not None or time.monotonic() > deadline):
                    raise RuntimeError("the simulator did not start: "
                                       + (workdir / "simulator.stderr").read_text(errors="replace")[-2000:])
                name, _, value = line.strip().partition("=")
                if name in ("REST_URL", "WS_URL"):
                    urls[name] = value
            threading.Thread(target=_drain, args=(process.stdout,), daemon=True).start()
            yield Simulator(process, urls["REST_URL"], urls["WS_URL"])
        finally:
            stop_process(process)


def _drain(stream: IO[str]) -> None:
    for _line in stream:
        pass


# -- the parent: the synthetic book ---------------------------------------------------------------


class SimulatorTops:
    """The simulator's top of book per market, polled every second on a thread (never on the feed's path)."""

    def __init__(self, rest_url: str) -> None:
        self._rest = BitvavoRest(rest_url)
        self.ticks = {r.market: r.tick_size for r in rules_from_markets(self._rest.markets()) if r.market in MARKETS}
        self.tops: dict[str, tuple[Decimal, Decimal, Decimal, Decimal]] = {}
        self._stop = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._poll, daemon=True, name="sim-tops")
        self._thread.start()

    def refresh(self) -> None:
        for row in self._rest.ticker_book():
            if row["market"] in MARKETS and row.get("bid") and row.get("ask"):
                self.tops[row["market"]] = (parse_decimal(row["bid"]), parse_decimal(row["bidSize"]),
                                            parse_decimal(row["ask"]), parse_decimal(row["askSize"]))

    def _poll(self) -> None:
        while not self._stop.wait(CENTER_POLL_S):
            with contextlib.suppress(Exception):  # a missed poll keeps the previous top: it is only a centre
                self.refresh()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._rest.close()


class BookFeed:
    """Synthetic `bitvavo:book` entries: the simulator's top shifted +/- offset, alternately, per market.

    It keeps the last `window` mids per market, as the signal engine does, and moves a mid one tick
    further out in the rare case it would equal the window mean (the baseline's "no deviation"), so
    every update after the first `window - 1` of a market is a signal.
    """

    def __init__(self, tops: SimulatorTops, offset_bps: Decimal, window: int) -> None:
        missing = [m for m in MARKETS if m not in tops.tops or m not in tops.ticks]
        if missing:
            raise RuntimeError(f"the simulator has no top of book for {', '.join(missing)}")
        self.tops = tops
        self.offset_bps = offset_bps
        self.nonces = dict.fromkeys(MARKETS, 0)
        self.mids: dict[str, deque[Decimal]] = {m: deque(maxlen=window) for m in MARKETS}
        self.count = 0

    def next_entry(self) -> tuple[str, int, dict[str, str]]:
        market = MARKETS[self.count % len(MARKETS)]
        self.count += 1
        nonce = self.nonces[market] = self.nonces[market] + 1
        bid, bid_size, ask, ask_size = self.tops.tops[market]
        tick = self.tops.ticks[market]
        ticks = max(1, int(((bid + ask) / 2 * self.offset_bps / 10_000 / tick).to_integral_value(ROUND_HALF_UP)))
        direction = 1 if nonce % 2 else -1
        shift = tick * ticks * direction
        mids = self.mids[market]
        mids.append((bid + ask) / 2 + shift)
        mean = sum(mids, Decimal(0)) / len(mids)
        if ((mids[-1] - mean) / mean * BPS).quantize(BPS_QUANTUM) == 0:
            shift += tick * direction
            mids[-1] += tick * direction
        ts = now_ms()
        fields = encode_entry({"market": market, "nonce": nonce, "bid": bid + shift, "bid_size": bid_size,
                               "ask": ask + shift, "ask_size": ask_size, "ts": ts, "recv_ts": ts})
        return market, nonce, fields


@dataclass
class FeedResult:
    sent_ns: dict[tuple[str, int], int]
    seconds: float
    max_late_ms: float


def feed(client: Any, stream: str, book: BookFeed, count: int, rate: float, maxlen: int) -> FeedResult:
    """XADD `count` entries at `rate`/s on a fixed schedule, stamping `time.time_ns()` right before each XADD."""
    interval_ns = int(1e9 / rate)
    sent: dict[tuple[str, int], int] = {}
    started = due = time.perf_counter_ns()
    max_late = 0
    for _ in range(count):
        wait = due - time.perf_counter_ns()
        if wait > 0:
            time.sleep(wait / 1e9)
        max_late = max(max_late, time.perf_counter_ns() - due)
        market, nonce, fields = book.next_entry()
        sent[(market, nonce)] = time.time_ns()
        client.xadd(stream, fields, maxlen=maxlen, approximate=True)
        due += interval_ns
    return FeedResult(sent, (time.perf_counter_ns() - started) / 1e9, max_late / 1e6)


# -- the parent: waiting on Redis ----------------------------------------------------------------


def _wait(condition: Callable[[], bool], children: Sequence[Child], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        for child in children:
            child.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)


def _has_group(client: Any, stream: str, group: str) -> bool:
    try:
        return any(info["name"] == group for info in client.xinfo_groups(stream))
    except ResponseError:  # no such stream yet
        return False


def _drained(client: Any, stream: str, group: str) -> bool:
    """The group has been handed every entry of the stream and acknowledged them all."""
    try:
        last = client.xinfo_stream(stream)["last-generated-id"]
        groups = client.xinfo_groups(stream)
    except ResponseError:
        return True  # nothing was ever written
    return any(g["name"] == group and g["pending"] == 0 and g["last-delivered-id"] == last for g in groups)


# -- the parent: metrics of the loops -------------------------------------------------------------


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def delta(after: Samples, before: Samples) -> Samples:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (sample, labels), value in samples.items():
        if sample == name and value:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + value
    return out


def mean_ms(samples: Samples, histogram: str) -> float | None:
    total = sum(v for (name, _), v in samples.items() if name == f"{histogram}_sum")
    count = sum(v for (name, _), v in samples.items() if name == f"{histogram}_count")
    return total / count * 1000 if count else None


# -- the parent: the run --------------------------------------------------------------------------


@dataclass
class Series:
    label: str
    values_ms: list[float] = field(default_factory=list)
    arrived_ns: list[int] = field(default_factory=list)

    def add(self, sent_ns: int, arrived_ns: int) -> None:
        self.values_ms.append((arrived_ns - sent_ns) / 1e6)
        self.arrived_ns.append(arrived_ns)

    def figures(self) -> tuple[float, float, float, float]:
        values = sorted(self.values_ms)
        return (percentile(values, 50), percentile(values, 90), percentile(values, 99), values[-1])


@dataclass
class Latencies:
    raw_bus: list[Series]  # 1, 2, 3 hops
    book_to_signal: Series
    book_to_intent: Series
    book_to_execution: Series
    statuses: dict[str, int]  # status of the first report of each measured intent
    raw_bus_lost: list[int]  # per hop, entries that never arrived


@dataclass
class RunResult:
    latencies: Latencies
    raw_bus_feed: FeedResult
    pipeline_feed: FeedResult
    warmup_updates: int
    metrics: dict[str, Samples]  # per loop, counters over the pipeline phase
    cpu_raw_bus: dict[str, float]  # share of one core per process group while the raw bus phase ran
    cpu_pipeline: dict[str, float]
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float]
    redis_version: str
    redis_shown: str
    profiles: dict[str, str] = field(default_factory=dict)


def _db_url(base: str, db: int | None, embedded: bool) -> str:
    if embedded or db is None:
        return base
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


class CpuMeter:
    """CPU time of named groups of processes over a phase, as shares of one core."""

    def __init__(self, groups: Mapping[str, Sequence[int]]) -> None:
        self.groups = groups
        self._started = time.monotonic()
        self._cpu = self._read()

    def _read(self) -> dict[str, float]:
        return {name: sum(process_cpu_s(pid) for pid in pids) for name, pids in self.groups.items()}

    def shares(self) -> dict[str, float]:
        elapsed = time.monotonic() - self._started
        now = self._read()
        return {name: (now[name] - self._cpu[name]) / elapsed for name in self.groups}


@dataclass
class Rig:
    """Everything running for one bench: the processes, their ports and consumer groups, the Redis client."""

    client: Any
    children: list[Child]
    ports: dict[str, int]
    signal_stream: str
    maxlen: int
    window: int
    cpu_groups: dict[str, list[int]] = field(default_factory=dict)

    @property
    def pipeline_groups(self) -> list[tuple[str, str]]:
        return [(STREAM_BOOK, "signal-engine"), (self.signal_stream, "trading-core"), (ORDERS_SHADOW, "executor")]

    @property
    def hop_groups(self) -> list[tuple[str, str]]:
        return [(HOP_STREAMS[k - 1], f"hop:{HOP_STREAMS[k]}") for k in range(1, HOPS + 1)]

    def wait_drained(self, groups: Sequence[tuple[str, str]], what: str) -> None:
        _wait(lambda: all(_drained(self.client, s, g) for s, g in groups), self.children, DRAIN_TIMEOUT_S,
              f"{what} to drain")


def start_children(env: Mapping[str, str], workdir: Path, signal_stream: str, profile: bool,
                   children: list[Child]) -> dict[str, int]:
    """The three loops, the three hops and the observer (appended to `children` as they start); the loops' ports."""
    ports = {role: free_port() for role in LOOPS}
    for role in LOOPS:
        profile_args = ["--profile-out", str(workdir / f"{role}.prof")] if profile else []
        children.append(Child(role, _bench_argv("--role", role, "--metrics-port", str(ports[role]), *profile_args),
                              env, workdir))
    for k in range(1, HOPS + 1):
        children.append(Child(f"hop{k}", _bench_argv("--role", "hop", "--hop-source", HOP_STREAMS[k - 1],
                                                     "--hop-target", HOP_STREAMS[k]), env, workdir))
    streams = [signal_stream, ORDERS_SHADOW, ORDERS_EXECUTED, *HOP_STREAMS[1:]]
    children.append(Child("observer", _bench_argv("--role", "observer", "--out", str(workdir / "arrivals.json"),
                                                  "--streams", ",".join(streams)), env, workdir, stdout=True))
    return ports


def wait_ready(rig: Rig) -> None:
    groups = rig.pipeline_groups + rig.hop_groups
    _wait(lambda: all(rig.client.exists(LEASE_KEY_PREFIX + role) for role in LOOPS)
          and all(_has_group(rig.client, s, g) for s, g in groups), rig.children, STARTUP_TIMEOUT_S,
          "the loops to hold their leases and every consumer group to exist")
    observer = rig.children[-1]
    assert observer.process.stdout is not None
    if observer.process.stdout.readline().strip() != b"READY":
        raise RuntimeError(f"observer did not start:\n{observer.stderr_tail()}")


def measure_raw_bus(rig: Rig, book: BookFeed, args: argparse.Namespace) -> tuple[FeedResult, dict[str, float]]:
    feed(rig.client, HOP_STREAMS[0], book, 100, args.rate, rig.maxlen)  # warm-up, not measured
    rig.wait_drained(rig.hop_groups, "the raw bus warm-up")
    meter = CpuMeter(rig.cpu_groups)
    fed = feed(rig.client, HOP_STREAMS[0], book, args.signals, args.rate, rig.maxlen)
    rig.wait_drained(rig.hop_groups, "the raw bus")
    return fed, meter.shares()


def warm_up_pipeline(rig: Rig, book: BookFeed, args: argparse.Namespace) -> int:
    """Fill both windows, then signal until the paper venue fills (its books are live); returns the updates fed."""
    fed: int = len(MARKETS) * (rig.window + args.warmup)
    feed(rig.client, STREAM_BOOK, book, fed, args.rate, rig.maxlen)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        rig.wait_drained(rig.pipeline_groups, "the pipeline warm-up")
        latest = rig.client.xrevrange(ORDERS_EXECUTED, count=1)
        if latest and latest[0][1].get("status") != "rejected":
            return fed
        if time.monotonic() > deadline:
            reason = latest[0][1].get("reason") if latest else "no execution at all"
            raise RuntimeError(f"the warm-up never got a paper fill (last: {reason})")
        feed(rig.client, STREAM_BOOK, book, 20, args.rate, rig.maxlen)
        fed += 20


def measure_pipeline(rig: Rig, book: BookFeed,
                     args: argparse.Namespace) -> tuple[FeedResult, dict[str, float], dict[str, Samples]]:
    before = {role: scrape(rig.ports[role]) for role in LOOPS}
    meter = CpuMeter(rig.cpu_groups)
    fed = feed(rig.client, STREAM_BOOK, book, args.signals, args.rate, rig.maxlen)
    rig.wait_drained(rig.pipeline_groups, "the pipeline")
    shares = meter.shares()
    return fed, shares, {role: delta(scrape(rig.ports[role]), before[role]) for role in LOOPS}


def stop_children(children: Sequence[Child]) -> None:
    """Ask every child to stop (stdin closed) and wait: the observer writes its arrivals as it exits."""
    for child in children:
        child.ask_to_stop()
    for child in children:
        if not child.wait(30.0):
            raise RuntimeError(f"{child.name} did not stop within 30 s:\n{child.stderr_tail()}")


def run(args: argparse.Namespace, base_url: str, embedded: bool, workdir: Path) -> RunResult:
    url = _db_url(base_url, args.redis_db, embedded)
    client: Any = sync_client(url)
    if client.dbsize():
        client.close()
        raise SystemExit(f"Redis DB {mask_url_password(url)} is not empty: the bench writes and flushes its own "
                         "DB; pick an empty one with --redis-db N, or unset REDIS_URL for an embedded server")
    load_start = os.getloadavg()
    info = client.info("server")
    redis_pids = [int(info["process_id"])] if Path(f"/proc/{info['process_id']}").exists() else []
    children: list[Child] = []
    tops: SimulatorTops | None = None
    try:
        with running_simulator(workdir) as sim:
            env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
            env.update(BENCH_ENV, REDIS_URL=url, PARQUET_DIR=str(workdir / "lake"),
                       BITVAVO_REST_URL=sim.rest_url, BITVAVO_WS_URL=sim.ws_url)
            settings = Settings.from_env(env)
            ports = start_children(env, workdir, settings.signal_stream, args.profile, children)
            rig = Rig(client, children, ports, settings.signal_stream, settings.stream_maxlen, settings.signal_window)
            rig.cpu_groups = {"signal engine": [children[0].pid], "trading core": [children[1].pid],
                              "executor": [children[2].pid], "hops (3)": [c.pid for c in children[3:3 + HOPS]],
                              "redis-server": redis_pids, "simulator": [sim.process.pid],
                              "observer": [children[-1].pid], "bench (feed)": [os.getpid()]}
            tops = SimulatorTops(sim.rest_url)
            wait_ready(rig)
            hop_feed, cpu_hops = measure_raw_bus(rig, BookFeed(tops, args.offset_bps, rig.window), args)
            book = BookFeed(tops, args.offset_bps, rig.window)
            warmup = warm_up_pipeline(rig, book, args)
            pipe_feed, cpu_pipe, metrics = measure_pipeline(rig, book, args)
            tops.close()
            tops = None
            stop_children(children)
            arrivals: dict[str, list[list[Any]]] = orjson.loads((workdir / "arrivals.json").read_bytes())
    finally:
        if tops is not None:
            tops.close()
        for child in children:
            child.stop()
        with contextlib.suppress(redis.RedisError):
            client.flushdb()  # ours: it was empty at the start
        client.close()
    load_end = os.getloadavg()
    profiles = {role: _profile_text(workdir / f"{role}.prof") for role in LOOPS} if args.profile else {}
    return RunResult(match_arrivals(arrivals, hop_feed, pipe_feed, settings.signal_stream), hop_feed, pipe_feed,
                     warmup, metrics, cpu_hops, cpu_pipe, load_start, load_end, info["redis_version"],
                     mask_url_password(url) + (" (embedded redis-server)" if embedded else " (REDIS_URL)"), profiles)


def match_arrivals(arrivals: Mapping[str, Sequence[Sequence[Any]]], raw_bus: FeedResult, pipeline: FeedResult,
                   signal_stream: str) -> Latencies:
    """Each book update's send time against the first arrival of its entry downstream (ids are deterministic)."""

    def first_arrivals(stream: str) -> dict[str, tuple[int, str]]:
        seen: dict[str, tuple[int, str]] = {}
        for key, status, ns in arrivals[stream]:
            seen.setdefault(key, (ns, status))
        return seen

    hops: list[Series] = []
    lost: list[int] = []
    for k in range(1, HOPS + 1):
        arrived = first_arrivals(HOP_STREAMS[k])
        series = Series(f"raw bus, {k} hop{'s' if k > 1 else ''}")
        for (market, nonce), ns in raw_bus.sent_ns.items():
            if f"{market}|{nonce}" in arrived:
                series.add(ns, arrived[f"{market}|{nonce}"][0])
        hops.append(series)
        lost.append(len(raw_bus.sent_ns) - len(series.values_ms))
    signals, intents, executions = (first_arrivals(s) for s in (signal_stream, ORDERS_SHADOW, ORDERS_EXECUTED))
    to_signal, to_intent, to_execution = Series("book -> signal"), Series("book -> intent"), Series("book -> execution")
    statuses: Counter[str] = Counter()
    for (market, nonce), ns in pipeline.sent_ns.items():
        signal_id = signal_id_for(STRATEGY, market, nonce)
        intent_id = intent_id_for(signal_id)
        if signal_id in signals:
            to_signal.add(ns, signals[signal_id][0])
        if intent_id in intents:
            to_intent.add(ns, intents[intent_id][0])
        if intent_id in executions:
            arrived_ns, status = executions[intent_id]
            to_execution.add(ns, arrived_ns)
            statuses[status] += 1
    return Latencies(hops, to_signal, to_intent, to_execution, dict(statuses), lost)


def _profile_text(path: Path, top: int = 12) -> str:
    if not path.exists():
        return "(no profile written)"
    out = io.StringIO()
    pstats.Stats(str(path), stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


# -- the report -----------------------------------------------------------------------------------


def _row(series: Series, note: str = "") -> str:
    if not series.values_ms:
        return f"  {series.label:<26} {0:>7,}   (none)"
    p50, p90, p99, worst = series.figures()
    return (f"  {series.label:<26} {len(series.values_ms):>7,} {p50:>8.2f} {p90:>8.2f} {p99:>8.2f} {worst:>8.2f}"
            + (f"   {note}" if note else ""))


def _ratio(series: Series, base: Series, target_ms: float | None) -> str:
    if not series.values_ms or not base.values_ms:
        return ""
    p50, _, p99, _ = series.figures()
    b50, _, b99, _ = base.figures()
    verdict = f"; target p99 <= {target_ms:g} ms: {'met' if p99 <= target_ms else 'MISSED'}" if target_ms else ""
    return (f"vs {base.label}: p50 x{p50 / b50:.1f} ({p50 - b50:+.2f} ms), p99 x{p99 / b99:.1f} "
            f"({p99 - b99:+.2f} ms){verdict}")


def _tally(counts: Mapping[str, float]) -> str:
    return ", ".join(f"{name or '-'} {value:,.0f}" for name, value in sorted(counts.items())) or "none"


def report(args: argparse.Namespace, r: RunResult) -> None:
    lat, hops = r.latencies, r.latencies.raw_bus
    fed = len(r.pipeline_feed.sent_ns)
    print("pipeline latency: bitvavo:book -> signal engine -> trading core -> executor (paper), "
          "each loop its own process" + ("  [under cProfile: figures not comparable]" if args.profile else ""))
    print(f"  machine: {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}; "
          f"Redis {r.redis_version} at {r.redis_shown}")
    print(f"  load average (1/5/15 min): {'/'.join(f'{x:.2f}' for x in r.load_start)} at start, "
          f"{'/'.join(f'{x:.2f}' for x in r.load_end)} at end (other work on the machine counts in every figure)")
    print(f"  feed: {fed:,} book updates per phase, {', '.join(MARKETS)} alternating, top of book = the "
          f"simulator's +/- {args.offset_bps} bps; asked {args.rate:,.0f}/s, got "
          f"{len(r.raw_bus_feed.sent_ns) / r.raw_bus_feed.seconds:,.0f}/s (raw bus) and "
          f"{fed / r.pipeline_feed.seconds:,.0f}/s (pipeline), worst pacing lag "
          f"{max(r.raw_bus_feed.max_late_ms, r.pipeline_feed.max_late_ms):.1f} ms; pipeline warm-up "
          f"{r.warmup_updates:,} updates (not measured)")
    print(f"  {'latency, ms':<26} {'count':>7} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}")
    for series in hops:
        print(_row(series))
    print(_row(lat.book_to_signal, _ratio(lat.book_to_signal, hops[0], None)))
    print(_row(lat.book_to_intent, _ratio(lat.book_to_intent, hops[1], 5.0)))
    print(_row(lat.book_to_execution, _ratio(lat.book_to_execution, hops[2], 10.0)))
    print("  (arrival = when the observer process's XREAD returned: its own wake-up is in every figure, so they "
          "are conservative; raw bus = XREADGROUP -> XADD + XACK in MULTI/EXEC per hop, one process per hop)")
    backlogs = {"raw bus (3 hops)": max_backlog(r.raw_bus_feed.sent_ns.values(), hops[-1].arrived_ns),
                "pipeline (to execution)": max_backlog(r.pipeline_feed.sent_ns.values(),
                                                       lat.book_to_execution.arrived_ns)}
    print("  largest backlog (updates sent, their last hop not arrived yet): "
          + ", ".join(f"{name} {peak:,} = {peak / args.rate * 1000:,.0f} ms of feed"
                      for name, peak in backlogs.items()))
    for name, peak in backlogs.items():
        if peak / args.rate > BEHIND_S:
            print(f"  SATURATED: the {name} fell {peak / args.rate:.1f}s of feed behind at {args.rate:g}/s: its tail "
                  "figures are queueing time (CPU starved by other work, or above capacity); lower --rate")
    _report_counts(lat, fed, r.metrics)
    print("  CPU while measured, share of one core: pipeline phase: "
          + ", ".join(f"{name} {share:.0%}" for name, share in r.cpu_pipeline.items()))
    print("                                         raw bus phase:  "
          + ", ".join(f"{name} {share:.0%}" for name, share in r.cpu_raw_bus.items()))
    for role, text in r.profiles.items():
        print(f"  cProfile of the {role} process (whole run), top 12 by tottime:")
        print("\n".join("    " + line for line in text.strip().splitlines()))


def _report_counts(lat: Latencies, fed: int, m: Mapping[str, Samples]) -> None:
    """How many made it through each loop, why the others did not (the loops' own counters), time inside them."""
    signals, intents, executions = (len(s.values_ms) for s in (lat.book_to_signal, lat.book_to_intent,
                                                               lat.book_to_execution))
    print(f"  counts: {fed:,} book updates -> {signals:,} signals -> {intents:,} intents -> {executions:,} executions "
          f"(first report: {_tally(lat.statuses)}; canceled = IOC with nothing to take within its limit)")
    missing = []
    if signals < fed:
        outcomes = by_label(m["signal-engine"], "trader_signal_engine_book_entries_total", "outcome")
        missing.append(f"{fed - signals:,} updates without a signal (signal engine outcomes: {_tally(outcomes)})")
    if intents < signals:
        rejects = by_label(m["trading-core"], "trading_core_rejects_total", "guard")
        missing.append(f"{signals - intents:,} signals without an intent (guard rejects: {_tally(rejects)})")
    if executions < intents:
        refusals = by_label(m["executor"], "trader_executor_refusals_total", "reason")
        missing.append(f"{intents - executions:,} intents without an execution (refusals: {_tally(refusals)})")
    if any(lat.raw_bus_lost):
        missing.append(f"raw bus entries lost per hop: {lat.raw_bus_lost}")
    dead = {role: sum(v for (name, _), v in m[role].items() if name.endswith("_dead_letters_total")) for role in LOOPS}
    errors = {role: sum(v for (name, _), v in m[role].items() if name.endswith("_handler_errors_total"))
              for role in LOOPS}
    if any(dead.values()) or any(errors.values()):
        missing.append(f"dead letters {dead}, handler errors {errors}")
    print("  missing: " + ("; ".join(missing) if missing else "none"))
    means = [(label, mean_ms(m[role], name)) for label, role, name in (
        ("signal engine evaluate", "signal-engine", "trader_signal_engine_processing_seconds"),
        ("core decision (handed -> committed)", "trading-core", "trading_core_decision_seconds"),
        ("executor venue.submit", "executor", "trader_executor_submit_latency_seconds"))]
    print("  inside the loops (means from their own histograms): "
          + ", ".join(f"{label} {value:.3f} ms" for label, value in means if value is not None))


# -- main -----------------------------------------------------------------------------------------


def _positive_bps(text: str) -> Decimal:
    try:
        value = parse_decimal(text.strip(), "--offset-bps")
    except DecimalParseError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of bps, got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline_latency", description=__doc__.splitlines()[0])
    parser.add_argument("--signals", type=int, default=10_000,
                        help="measured book updates, each one a signal (the issue: >= 10,000)")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE,
                        help=f"book updates per second, steady (default {DEFAULT_RATE:g}: below saturation here)")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured signals per market before measuring")
    parser.add_argument("--offset-bps", type=_positive_bps, default=Decimal("3"),
                        help="how far each synthetic mid sits from the simulator's, alternately up and down")
    parser.add_argument("--redis-db", type=int, default=None,
                        help="with REDIS_URL: the (empty) DB to use instead of the URL's")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile each loop process (slows them down) and print its top 12 by tottime")
    parser.add_argument("--role", choices=(*LOOPS, "hop", "observer"), help=argparse.SUPPRESS)
    parser.add_argument("--metrics-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", help=argparse.SUPPRESS)
    parser.add_argument("--hop-source", help=argparse.SUPPRESS)
    parser.add_argument("--hop-target", help=argparse.SUPPRESS)
    parser.add_argument("--streams", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role is None and (args.signals < 1 or not 0 < args.rate < math.inf or args.warmup < 1):
        parser.error("--signals, --rate and --warmup must be positive (and the rate finite)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.role in LOOPS:
        loop_main(args)
        return
    if args.role == "hop":
        hop_main(args)
        return
    if args.role == "observer":
        observer_main(args)
        return
    settings = Settings.from_env()
    # A SIGTERM unwinds like Ctrl-C, so every `finally` stops the processes it started.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        with redis_url(settings) as base_url:
            result = run(args, base_url, settings.redis_url is None, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    report(args, result)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
