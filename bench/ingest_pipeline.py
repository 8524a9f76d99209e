"""Order book ingest end to end: book updates per second through `run_ingest(OrderbookIngest())`.

A feeder subprocess (its CPU stays out of the measured process) serves a local aiohttp
WebSocket speaking enough of Bitvavo's protocol for our client: it acks `subscribe`, sends one
`book` event per market, answers the `getBook` that event triggers with a snapshot whose nonce
precedes it, and, once this process has seen every book live, streams the pre-serialised
`book` events as fast as the socket takes them. Events come from `bench.book_apply.generate`
(padded wire strings, 1-4 level changes per event, 100 levels per side): a base sequence is
generated once and replayed for every market and cycle with fresh nonces and timestamps, all
frames serialised before the clock starts.

Measured here: decode -> book apply -> lake (JSONL) + both streams (`bitvavo:orderbook:update`,
`bitvavo:book`) in Redis, from "go" until every update's two entries are written to Redis
(the lake is written before Redis in every flush). Then, in the same process against the same
Redis and with the same client library, the ceiling: the same entries (read back from the
streams) XADDed raw in pipelines of 500 with MAXLEN ~, two entries per update. For reading the
ratio: our publisher sends a batch as one Lua call, not as a pipeline (see trading/bus.py), so
our publisher and lake writer alone on the same entries are printed too.

Also printed: the rate at which updates were applied (decode + book, whether or not their
entries had reached Redis), the largest backlog of stream entries emitted but not yet in Redis,
RSS at the checkpoint (1M) and at the end, peak RSS, GC time, and the CPU of this process,
redis-server and the feeder. A run whose RSS passes --max-rss-mb (default 3 GB) is stopped and
reported as ABORTED with the figures so far, rather than taking the machine's memory.

    python -m bench.ingest_pipeline                    # the issue's run: 5,000,000 updates
    python -m bench.ingest_pipeline --updates 1000000  # shorter
    python -m bench.ingest_pipeline --updates 300000 --profile --no-ceiling   # where the time goes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import os
import pstats
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
from aiohttp import web

from bench.book_apply import generate
from trading.bus import STREAM_BOOK, STREAM_ORDERBOOK_UPDATE, StreamPublisher
from trading.config import DEFAULT_MARKETS, Settings
from trading.ingest.orderbook import TOP_CHANNEL, UPDATE_CHANNEL, OrderbookIngest
from trading.ingest.runner import run_ingest
from trading.lake import LakeWriter
from trading.processes import stop_process
from trading.redis_conn import EmbeddedRedis, async_client

ROOT = Path(__file__).resolve().parents[1]
BATCH = 500             # the publisher's default batch size; the ceiling pipelines as many XADDs
STALL_S = 60.0          # no progress for this long: the run is broken, stop it loudly
READY_TIMEOUT_S = 600.0  # the feeder's pre-generation (5M frames on a slow box)
TEXT = aiohttp.WSMsgType.TEXT
FRAME = b'{"event":"book","market":"%b","nonce":%d,%b,"timestamp":%d}'
NS_PER_UPDATE = 40_000  # exchange timestamps advance as if the feed ran at 25,000 updates/s


def market_names(count: int) -> tuple[str, ...]:
    extra = tuple(f"BENCH{i}-EUR" for i in range(max(count - len(DEFAULT_MARKETS), 0)))
    return (DEFAULT_MARKETS + extra)[:count]


def rss_kb() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in kB."""
    values: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                values[name] = int(value.split()[0])
    return values["VmRSS"], values["VmHWM"]


def process_cpu_s(pid: int | None) -> float:
    """utime + stime of another process, from /proc/<pid>/stat (0.0 if unknown)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# The feeder (a subprocess) -------------------------------------------------------------------


@dataclass
class Feed:
    snapshots: dict[str, bytes]   # getBook response per market, nonce 1
    prelude: dict[str, bytes]     # the first event per market (nonce 2): it makes the client ask getBook
    frames: list[bytes]           # everything after it, markets interleaved, nonce 3 onwards


def build_feed(markets: Sequence[str], updates: int, base_events: int, levels: int, seed: int) -> Feed:
    snapshot, events = generate(levels, base_events, seed)
    # b'"bids":[...],"asks":[...]' of each base event; only nonce and timestamp change per replay.
    bodies = [orjson.dumps({"bids": e["bids"], "asks": e["asks"]})[1:-1] for e in events]
    del events
    names = [m.encode() for m in markets]
    count, base = len(markets), len(bodies)
    ts0 = time.time_ns()
    snapshots = {m: orjson.dumps({**snapshot, "market": m, "timestamp": ts0}) for m in markets}
    prelude = {m: FRAME % (name, 2, bodies[0], ts0) for m, name in zip(markets, names, strict=True)}
    # Frame k belongs to market k % count and is that market's event number i = k // count + 1 (nonce i + 2).
    # Replaying the base sequence from its end state keeps the book bounded: a level's size is absolute.
    frames = [FRAME % (names[k % count], k // count + 3, bodies[(k // count + 1) % base], ts0 + (k + 1) * NS_PER_UPDATE)
              for k in range(updates)]
    return Feed(snapshots, prelude, frames)


@dataclass
class FeedState:
    connections: int = 0
    subscribed: list[str] = field(default_factory=list)
    snapshots_served: int = 0
    sent: int = 0
    stream_s: float = 0.0
    stream_cpu_s: float = 0.0
    started: float = 0.0
    started_cpu: float = 0.0
    done: bool = False
    error: str = ""


async def serve_feed(markets: Sequence[str], updates: int, base_events: int, levels: int, seed: int) -> None:
    gc.disable()  # building millions of objects: no collector passes over them while they pile up
    started = time.perf_counter()
    feed = build_feed(markets, updates, base_events, levels, seed)
    build_s = time.perf_counter() - started
    gc.collect()
    gc.freeze()
    gc.enable()
    state = FeedState()
    go = asyncio.Event()

    async def stream(ws: web.WebSocketResponse) -> None:
        await go.wait()
        send = ws.send_frame
        state.started, state.started_cpu = time.perf_counter(), time.process_time()
        try:
            for frame in feed.frames:
                await send(frame, TEXT)
            state.sent = len(feed.frames)
        except (ConnectionError, aiohttp.ClientError) as exc:
            state.error = f"stream stopped: {exc!r}"
        state.stream_s = time.perf_counter() - state.started
        state.stream_cpu_s = time.process_time() - state.started_cpu
        state.done = True

    async def on_ws(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, max_msg_size=0)
        await ws.prepare(request)
        state.connections += 1
        if state.connections > 1:  # one feed, once: a reconnect is a failed run, reported as such
            state.error = "the client reconnected"
            await ws.close()
            return ws
        streamer = asyncio.create_task(stream(ws))
        try:
            async for message in ws:  # pings are answered by aiohttp (autoping)
                if message.type is not TEXT:
                    continue
                frame = orjson.loads(message.data)
                action = frame.get("action")
                if action == "subscribe":
                    wanted = sorted(m for channel in frame.get("channels", []) if channel.get("name") == "book"
                                    for m in channel.get("markets", []))
                    state.subscribed = wanted
                    await ws.send_frame(orjson.dumps({"event": "subscribed", "subscriptions": {"book": wanted}}),
                                        TEXT)
                    for market in wanted:
                        if market in feed.prelude:
                            await ws.send_frame(feed.prelude[market], TEXT)
                elif action == "getBook":
                    request_id, market = frame.get("requestId"), frame.get("market")
                    snapshot = feed.snapshots.get(market)
                    if snapshot is None:
                        reply = orjson.dumps({"action": "getBook", "requestId": request_id, "errorCode": 205,
                                              "error": "market parameter is invalid"})
                    else:
                        reply = b'{"action":"getBook","requestId":%d,"response":%b}' % (request_id, snapshot)
                        state.snapshots_served += 1
                    await ws.send_frame(reply, TEXT)
        finally:
            if not streamer.done():
                streamer.cancel()
        return ws

    async def on_go(request: web.Request) -> web.Response:
        go.set()
        return web.json_response({"ok": True})

    async def on_stats(request: web.Request) -> web.Response:
        sending = bool(state.started and not state.done)
        if sending:  # the figures so far
            state.stream_s = time.perf_counter() - state.started
            state.stream_cpu_s = time.process_time() - state.started_cpu
        return web.json_response({"sending": sending, "build_s": build_s, "frames": len(feed.frames),
                                  "connections": state.connections,
                                  "subscribed": state.subscribed, "snapshots_served": state.snapshots_served,
                                  "sent": state.sent, "stream_s": state.stream_s,
                                  "stream_cpu_s": state.stream_cpu_s, "error": state.error})

    app = web.Application()
    app.add_routes([web.get("/", on_ws), web.post("/go", on_go), web.get("/stats", on_stats)])
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    print(f"READY {sock.getsockname()[1]} {build_s:.1f}", flush=True)
    try:
        await asyncio.Event().wait()  # until SIGTERM, or the parent's pipe closes (see feeder_main)
    finally:
        await runner.cleanup()


def feeder_main(args: argparse.Namespace) -> None:
    def exit_when_parent_goes() -> None:
        sys.stdin.buffer.read()  # EOF: the parent is gone (or done); never outlive it
        os._exit(0)

    threading.Thread(target=exit_when_parent_goes, daemon=True).start()
    asyncio.run(serve_feed(args.feeder_markets.split(","), args.updates, args.base_events, args.levels, args.seed))


class Feeder:
    """The feeder subprocess: started, waited for (READY), stopped by PID in `stop()`."""

    def __init__(self, markets: Sequence[str], updates: int, base_events: int, levels: int, seed: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.ingest_pipeline", "--feeder", "--feeder-markets", ",".join(markets),
             "--updates", str(updates), "--base-events", str(base_events), "--levels", str(levels),
             "--seed", str(seed)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.port = 0
        self.build_s = 0.0

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"feeder exited with code {self.process.returncode} before it was ready")
            readable, _, _ = select.select([stdout], [], [], 0.5)
            if readable:
                words = stdout.readline().decode().split()
                if len(words) == 3 and words[0] == "READY":
                    self.port, self.build_s = int(words[1]), float(words[2])
                    return
                raise RuntimeError(f"feeder said {' '.join(words)!r} instead of READY")
        raise RuntimeError(f"feeder not ready after {timeout_s:.0f}s")

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        stop_process(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()


# The measured pipeline ---------------------------------------------------------------------


@dataclass
class PipelineResult:
    target: int                # updates the feed holds
    applied: int               # updates applied when the measurement ended
    seconds: float             # go -> every applied update's two entries in Redis (or the abort)
    applied_s: float           # go -> the last update applied
    cpu_s: float
    checkpoint: int
    checkpoint_s: float
    rss_checkpoint_kb: int
    backlog_checkpoint: int    # stream entries emitted but not yet in Redis, at the checkpoint
    backlog_max: int
    rss_end_kb: int
    hwm_end_kb: int
    gc_s: float
    gc_collections: tuple[int, int, int]
    redis_cpu_s: float = 0.0
    in_redis: int = 0          # stream entries written when the measurement ended
    aborted: str = ""
    entries_written: int = 0   # after the loop's shutdown flush
    entries_dropped: int = 0
    batches_failed: int = 0
    rows_written: int = 0
    resyncs: int = 0
    parse_errors: int = 0
    reconnects: int = 0
    handler_errors: int = 0
    ws_error: str = ""
    feeder: dict[str, Any] = field(default_factory=dict)
    profile: str = ""


class GcTimer:
    """Wall time spent in the cyclic garbage collector, per `gc.callbacks`."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


async def _wait_for(condition: Callable[[], bool], run: asyncio.Task[Any], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if run.done():
            await run  # raises the pipeline's error, if it has one
            raise RuntimeError(f"the ingest loop stopped while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.01)


async def run_pipeline(settings: Settings, redis_url: str, redis_pid: int | None, feeder: Feeder,
                       markets: Sequence[str], updates: int, checkpoint: int, max_rss_mb: int,
                       profile: bool) -> PipelineResult:
    handler = OrderbookIngest()
    # The feed goes quiet once exhausted while the backlog may still be draining: no silence reconnect then.
    run = asyncio.create_task(run_ingest(handler, settings, redis_url=redis_url, ws_silence_timeout_s=3600))
    syncs = handler.books.syncs
    try:
        await _wait_for(lambda: len(syncs) == len(markets) and all(s.is_live for s in syncs.values()), run, 60,
                        "every book to be live")
        context = handler.context
        stats = handler.books.stats
        sink = context.sink
        publisher: StreamPublisher = sink._publisher  # read-only: its counters say what reached Redis
        # Events buffered before the snapshots are recorded too; let them reach Redis, then count from here.
        await _wait_for(lambda: publisher.stats.entries_written >= 2 * stats.applied, run, 30,
                        "the pre-start updates to reach Redis")
        applied0 = stats.applied
        written0 = publisher.stats.entries_written + publisher.stats.entries_dropped
        async with aiohttp.ClientSession() as http:
            gc.collect()
            profiler = cProfile.Profile() if profile else None
            async with http.post(feeder.http_url + "/go") as reply:
                reply.raise_for_status()
            with GcTimer() as gc_timer:
                if profiler is not None:
                    profiler.enable()
                started, cpu_started = time.perf_counter(), time.process_time()
                redis_cpu_started = process_cpu_s(redis_pid)
                cp_s = applied_s = 0.0
                rss_cp = backlog_cp = backlog_max = 0
                aborted = ""
                last_seen, last_progress, next_rss_check = (0, 0), started, started
                while True:
                    await asyncio.sleep(0.01)
                    now = time.perf_counter()
                    applied = stats.applied - applied0
                    written = publisher.stats.entries_written + publisher.stats.entries_dropped - written0
                    backlog_max = max(backlog_max, 2 * applied - written)
                    if not cp_s and applied >= checkpoint:
                        cp_s, rss_cp, backlog_cp = now - started, rss_kb()[0], 2 * applied - written
                    if not applied_s and applied >= updates:
                        applied_s = now - started
                    if applied >= updates and written >= 2 * updates:
                        break
                    if now >= next_rss_check:
                        next_rss_check = now + 0.5
                        rss = rss_kb()[0]
                        if rss > max_rss_mb * 1024:
                            aborted = (f"RSS {rss / 1024:,.0f} MB > --max-rss-mb {max_rss_mb:,} at {applied:,} updates "
                                       f"applied, {2 * applied - written:,} stream entries waiting for Redis")
                            break
                    if (applied, written) != last_seen:
                        last_seen, last_progress = (applied, written), now
                    elif now - last_progress > STALL_S:
                        raise RuntimeError(f"no progress for {STALL_S:.0f}s at {applied:,} of {updates:,} updates "
                                           f"({written:,} stream entries)")
                    if run.done():
                        await run
                        raise RuntimeError("the ingest loop stopped before the feed was consumed")
                seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
                redis_cpu_s = process_cpu_s(redis_pid) - redis_cpu_started
                if profiler is not None:
                    profiler.disable()
            rss_end, hwm_end = rss_kb()
            async with http.get(feeder.http_url + "/stats") as reply:
                feeder_stats = await reply.json()
        result = PipelineResult(updates, stats.applied - applied0, seconds, applied_s or seconds, cpu_s, checkpoint,
                                cp_s or seconds, rss_cp or rss_end, backlog_cp, backlog_max, rss_end, hwm_end,
                                gc_timer.seconds, (gc_timer.collections[0], gc_timer.collections[1],
                                                   gc_timer.collections[2]),
                                redis_cpu_s=redis_cpu_s, in_redis=written, aborted=aborted, feeder=feeder_stats)
        if aborted:
            # Do not let the loop's shutdown flush push a multi-GB backlog through Redis.
            publisher.drop_pending()
        if profiler is not None:
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
            result.profile = out.getvalue()
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
    # After the loop's own shutdown flush: everything it buffered is counted.
    result.entries_written, result.entries_dropped = publisher.stats.entries_written, publisher.stats.entries_dropped
    result.batches_failed, result.rows_written = publisher.stats.batches_failed, context.sink.rows_written
    result.resyncs, result.parse_errors = handler.books.resyncs, stats.parse_errors
    result.reconnects, result.handler_errors = context.ws.stats.reconnects, context.ws.stats.handler_errors
    result.ws_error = context.ws.stats.last_error
    return result


# The ceiling and the components, on the entries the pipeline wrote -------------------------


@dataclass
class CeilingResult:
    updates: int
    xadd_s: float
    publisher_s: float
    lake_s: float


def _row(fields: dict[str, str]) -> dict[str, Any]:
    """The row the handler emitted, from its stream entry (ints and level lists restored)."""
    row: dict[str, Any] = dict(fields)
    for key in ("v", "ts", "recv_ts", "nonce"):
        row[key] = int(row[key])
    for key in ("bids", "asks"):
        if key in row:
            row[key] = orjson.loads(row[key])
    return row


async def measure_ceiling(redis_url: str, maxlen: int, updates: int, lake_root: Path) -> CeilingResult:
    client = async_client(redis_url)
    try:
        Entries = list[tuple[str, dict[str, str]]]  # decode_responses=True
        raw_updates = cast(Entries, await client.xrange(STREAM_ORDERBOOK_UPDATE, count=updates))
        raw_tops = cast(Entries, await client.xrange(STREAM_BOOK, count=2 * updates))
        tops = {(f["market"], f["nonce"]): f for _id, f in raw_tops}
        pairs = [(f, tops[(f["market"], f["nonce"])]) for _id, f in raw_updates if (f["market"], f["nonce"]) in tops]
        if not pairs:
            raise RuntimeError("no entries in the streams to replay for the ceiling")
        pairs = (pairs * (updates // len(pairs) + 1))[:updates]  # cycle when the streams hold fewer
        entries = [(stream, fields) for update, top in pairs
                   for stream, fields in ((STREAM_ORDERBOOK_UPDATE, update), (STREAM_BOOK, top))]
        del raw_updates, raw_tops, tops

        gc.collect()
        started = time.perf_counter()
        for start in range(0, len(entries), BATCH):
            pipe = client.pipeline(transaction=False)
            for stream, fields in entries[start:start + BATCH]:
                pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
            await pipe.execute()
        xadd_s = time.perf_counter() - started

        rows = [(stream, _row(fields)) for stream, fields in entries]
        publisher = StreamPublisher(redis_url, maxlen=maxlen, batch_size=BATCH)
        try:
            gc.collect()
            started = time.perf_counter()
            for stream, row in rows:
                await publisher.publish(stream, row)
            await publisher.flush()
            publisher_s = time.perf_counter() - started
        finally:
            await publisher.aclose()
        if publisher.stats.entries_written != len(rows):
            raise RuntimeError(f"publisher wrote {publisher.stats.entries_written:,} of {len(rows):,} entries")

        # The lake as the sink writes it: per flush, one batch per channel (about 1,000 updates a flush).
        update_rows = [row for stream, row in rows if stream == STREAM_ORDERBOOK_UPDATE]
        top_rows = [row for stream, row in rows if stream == STREAM_BOOK]
        writers = [LakeWriter(lake_root, UPDATE_CHANNEL), LakeWriter(lake_root, TOP_CHANNEL)]
        try:
            gc.collect()
            started = time.perf_counter()
            for start in range(0, len(update_rows), 1000):
                writers[0].write_batch(update_rows[start:start + 1000])
                writers[1].write_batch(top_rows[start:start + 1000])
            lake_s = time.perf_counter() - started
        finally:
            for writer in writers:
                writer.close()
        return CeilingResult(len(pairs), xadd_s, publisher_s, lake_s)
    finally:
        await client.aclose()


# Main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest_pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=5_000_000, help="book updates to push through (the issue: 5M)")
    parser.add_argument("--checkpoint", type=int, default=1_000_000, help="RSS is compared from here to the end")
    parser.add_argument("--markets", type=int, default=5, help="markets on the one socket")
    parser.add_argument("--base-events", type=int, default=50_000,
                        help="generated events, replayed with fresh nonces (generation is slow)")
    parser.add_argument("--levels", type=int, default=100, help="levels per side in the snapshot")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--ceiling-updates", type=int, default=100_000,
                        help="updates (x2 entries) replayed for the ceiling and the components")
    parser.add_argument("--no-ceiling", action="store_true")
    parser.add_argument("--max-rss-mb", type=int, default=3072,
                        help="stop the run (and say so) when this process's RSS passes this")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the measured process (slows it down) and print the top 15 by tottime")
    parser.add_argument("--feeder", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--feeder-markets", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


async def _measure(args: argparse.Namespace, settings: Settings, redis_url: str, redis_pid: int | None, feeder: Feeder,
                   markets: Sequence[str], workdir: Path) -> tuple[PipelineResult, CeilingResult | None]:
    pipeline = await run_pipeline(settings, redis_url, redis_pid, feeder, markets, args.updates,
                                  min(args.checkpoint, args.updates), args.max_rss_mb, args.profile)
    ceiling = None
    if not args.no_ceiling:
        ceiling = await measure_ceiling(redis_url, settings.stream_maxlen, args.ceiling_updates,
                                        workdir / "components-lake")
    return pipeline, ceiling


def report(args: argparse.Namespace, markets: Sequence[str], feeder: Feeder, p: PipelineResult,
           c: CeilingResult | None) -> None:
    mb = 1024
    done = p.in_redis // 2  # updates whose two entries are in Redis (their lake rows were written first)
    rate = done / p.seconds
    end_label = f"{p.target:,}" if not p.aborted else f"abort ({p.applied:,})"
    print(f"ingest pipeline end to end: local WebSocket -> decode -> book apply -> lake + 2 Redis streams, "
          f"one process{' (under cProfile: rates not comparable)' if args.profile else ''}")
    plural = "s" if len(markets) != 1 else ""
    print(f"  run: {p.target:,} updates over {len(markets)} market{plural} ({', '.join(markets)}), "
          f"{args.base_events:,} generated events replayed, {args.levels} levels/side; "
          f"feed built in {feeder.build_s:.1f}s")
    if p.aborted:
        print(f"  ABORTED: {p.aborted}")
    print(f"  ours, end to end:               {rate:>12,.0f} updates/s   ({done:,} updates in lake + Redis in "
          f"{p.seconds:.1f}s)   (target: >=25,000/s)")
    print(f"  ours, applied to the books:     {p.applied / p.applied_s:>12,.0f} updates/s   ({p.applied:,} in "
          f"{p.applied_s:.1f}s; at most {p.backlog_max:,} stream entries waiting for Redis)")
    if c is not None:
        ceiling = c.updates / c.xadd_s
        print(f"  ceiling, pipelined XADD:        {ceiling:>12,.0f} updates/s   ({2 * c.updates:,} entries, "
              f"batches of {BATCH}, MAXLEN ~ {args.maxlen:,}, same client and Redis)")
        print(f"  ratio ours/ceiling:             {rate / ceiling:>12.2f}   (target: >=0.5)")
        print(f"  same entries, components alone: publisher (encode + Lua XADD) {c.updates / c.publisher_s:,.0f} "
              f"updates/s; lake writer {c.updates / c.lake_s:,.0f} updates/s")
    growth = (p.rss_end_kb - p.rss_checkpoint_kb) / mb
    print(f"  RSS at {p.checkpoint:,} / at {end_label} / peak:  {p.rss_checkpoint_kb / mb:,.1f} / "
          f"{p.rss_end_kb / mb:,.1f} / {p.hwm_end_kb / mb:,.1f} MB   ({p.backlog_checkpoint:,} entries waiting "
          f"for Redis at {p.checkpoint:,})")
    print(f"  RSS growth {p.checkpoint:,} -> {end_label}:  {growth:>+10,.1f} MB   (target: <50 MB)")
    f = p.feeder
    print(f"  CPU while measured: this process {p.cpu_s / p.seconds:.0%} of a core (GC {p.gc_s:.1f}s, "
          f"collections {'/'.join(map(str, p.gc_collections))}), redis-server {p.redis_cpu_s / p.seconds:.0%}, "
          f"feeder {f.get('stream_cpu_s', 0) / p.seconds:.0%}")
    problems = []
    if not p.aborted:
        if p.entries_written < 2 * p.target or p.entries_dropped or p.batches_failed:
            problems.append(f"{p.entries_dropped:,} stream entries dropped, {p.batches_failed} batches failed")
        if p.rows_written < 2 * p.target:
            problems.append(f"only {p.rows_written:,} lake rows")
    if p.resyncs or p.parse_errors or p.reconnects or p.handler_errors or f.get("error"):
        problems.append(f"resyncs {p.resyncs}, parse errors {p.parse_errors}, reconnects {p.reconnects} "
                        f"({p.ws_error or 'no error'}), handler errors {p.handler_errors}, "
                        f"feeder: {f.get('error') or 'ok'}")
    print(f"  check: {p.entries_written:,} stream entries, {p.rows_written:,} lake rows (incl. snapshots); "
          f"feeder {'was still sending' if f.get('sending') else 'sent everything'} after {f.get('stream_s', 0):.1f}s; "
          + ("OK" if not problems else "PROBLEM: " + "; ".join(problems)))
    if p.profile:
        print("  cProfile of the measured process, top 15 by tottime:")
        print("\n".join("    " + line for line in p.profile.strip().splitlines()))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.feeder:
        feeder_main(args)
        return
    if args.updates < 1 or args.markets < 1 or args.base_events < 1:
        raise SystemExit("--updates, --markets and --base-events must be positive")
    markets = market_names(args.markets)
    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    redis_server = EmbeddedRedis()
    feeder: Feeder | None = None
    try:
        redis_server.start()
        feeder = Feeder(markets, args.updates, args.base_events, args.levels, args.seed)
        feeder.wait_ready()
        settings = Settings.from_env({"INGEST_MARKETS": ",".join(markets), "PARQUET_DIR": str(workdir / "lake"),
                                      "REDIS_URL": redis_server.url, "BITVAVO_WS_URL": feeder.ws_url,
                                      "BITVAVO_REST_URL": feeder.http_url})
        args.maxlen = settings.stream_maxlen
        pipeline, ceiling = asyncio.run(_measure(args, settings, redis_server.url, redis_server.pid, feeder, markets,
                                                      workdir))
    finally:
        if feeder is not None:
            feeder.stop()
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    assert feeder is not None
    report(args, markets, feeder, pipeline, ceiling)


if __name__ == "__main__":
    main()
