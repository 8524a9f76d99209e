"""The exchange simulator as a real subprocess, for integration tests.

    def test_something(sim):                       # one shared instance per test module
        requests.get(sim.rest_url + "/time")
        sim.skip_nonce("BTC-EUR"); sim.drop_connections()

    def test_other(sim_factory):                   # a private instance with extra CLI flags
        sim = sim_factory("--rate-limit", "20", "--ban-seconds", "2", markets="BTC-EUR")

`run_simulator(...)` is the context manager behind both, usable outside pytest fixtures. The
process is stopped by PID (SIGTERM, then SIGKILL) in `finally`.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis.asyncio

from trading.processes import free_port, stop_process
from trading.redis_conn import async_client
from trading.sim.config import DEFAULT_API_KEY, DEFAULT_API_SECRET

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEFAULT_SIM_MARKETS = "BTC-EUR,ETH-EUR,XRP-EUR,WMTX-EUR"
STARTUP_TIMEOUT_S = 20.0


@dataclass
class SimHandle:
    rest_url: str  # http://127.0.0.1:PORT/v2
    ws_url: str  # ws://127.0.0.1:PORT/v2/
    control_url: str  # http://127.0.0.1:PORT/_sim
    api_key: str
    api_secret: str
    process: subprocess.Popen[str]

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> int:
        """SIGTERM (SIGKILL after 5 s); returns the exit code. Idempotent."""
        return stop_process(self.process)

    def control(self, **changes: Any) -> dict[str, Any]:
        """POST /_sim/faults with `changes` (keys as in docs/simulator.md); returns the stats."""
        request = urllib.request.Request(self.control_url + "/faults", data=json.dumps(changes).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            result: dict[str, Any] = json.loads(response.read())
        return result

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.control_url + "/stats", timeout=10) as response:
            result: dict[str, Any] = json.loads(response.read())
        return result

    def drop_connections(self, mode: str = "abort") -> None:
        """Close every WebSocket: 'abort' drops TCP without a close frame, 'close' sends 1001."""
        self.control(drop_connections=mode)

    def skip_nonce(self, market: str) -> None:
        self.control(skip_nonce=market)

    def inject_frame(self, text: str) -> None:
        """Send raw text (malformed on purpose, if you like) to every connected WebSocket."""
        self.control(inject_frame=text)

    def pause_feed(self) -> None:
        self.control(pause_feed=True)

    def resume_feed(self) -> None:
        self.control(pause_feed=False)

    def step(self, count: int = 1) -> None:
        """Run `count` generator steps in every market now (works while paused)."""
        self.control(step=count)

    def set_book_rate(self, rate: float) -> None:
        self.control(book_rate=rate)

    def fail_next(self, count: int = 1, error_code: int = 111, execute: bool = False) -> None:
        self.control(rest_errors={"count": count, "error_code": error_code, "execute": execute})

    def hang_next(self, count: int = 1, seconds: float = 30.0, execute: bool = False) -> None:
        self.control(rest_timeouts={"count": count, "seconds": seconds, "execute": execute})

    def delay_next(self, count: int = 1, seconds: float = 2.0) -> None:
        """The next `count` REST calls are executed and answered `seconds` late."""
        self.control(rest_delays={"count": count, "seconds": seconds})

    def reset_rate_limits(self) -> None:
        self.control(reset_rate_limits=True)

    def set_market_status(self, market: str, status: str) -> None:
        self.control(market_status={market: status})


def _read_lines(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.strip())
    lines.put(None)


@contextmanager
def run_simulator(*extra_args: str, seed: int = 7, markets: str = DEFAULT_SIM_MARKETS,
                  book_rate: float = 20.0) -> Iterator[SimHandle]:
    """Start `python -m trading.sim --port 0 ...`, wait for its URLs, stop it by PID afterwards."""
    args = [sys.executable, "-m", "trading.sim", "--port", "0", "--seed", str(seed), "--markets", markets,
            "--book-rate", str(book_rate), *extra_args]
    with tempfile.TemporaryFile(mode="w+") as stderr:
        process = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            lines: queue.Queue[str | None] = queue.Queue()
            threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
            urls: dict[str, str] = {}
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while len(urls) < 3:
                try:
                    line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    line = None
                if line is None:
                    stderr.seek(0)
                    raise RuntimeError(f"simulator did not start (exit {process.poll()}):\n{stderr.read()[-4000:]}")
                name, _, value = line.partition("=")
                if name in ("REST_URL", "WS_URL", "CONTROL_URL"):
                    urls[name] = value
            key = _flag(extra_args, "--api-key", DEFAULT_API_KEY)
            secret = _flag(extra_args, "--api-secret", DEFAULT_API_SECRET)
            yield SimHandle(urls["REST_URL"], urls["WS_URL"], urls["CONTROL_URL"], key, secret, process)
        finally:
            stop_process(process)


def _flag(args: tuple[str, ...], name: str, default: str) -> str:
    return args[args.index(name) + 1] if name in args else default


@pytest.fixture(scope="module")
def sim() -> Iterator[SimHandle]:
    """One simulator per test module (seed 7; BTC/ETH/XRP trading, WMTX halted; 20 book updates/s)."""
    with run_simulator() as handle:
        yield handle


@pytest.fixture
def sim_factory() -> Iterator[Callable[..., SimHandle]]:
    """Start extra simulators: `sim_factory(*cli_args, seed=..., markets=..., book_rate=...)`."""
    with ExitStack() as stack:
        yield lambda *args, **kwargs: stack.enter_context(run_simulator(*args, **kwargs))


@pytest.fixture
async def client(redis_db_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """An async Redis client on the test's own DB, closed after the test."""
    connection = async_client(redis_db_url)
    try:
        yield connection
    finally:
        await connection.aclose()


@pytest.fixture
async def live_client(redis_db_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """The test's Redis with the go-live gate open (a fresh GO for an hour): live intents may be sent."""
    from trading.clock import now_ms
    from trading.golive import record_decision

    connection = async_client(redis_db_url)
    await record_decision(connection, decision="GO", operator="test", reason="test", decided_ms=now_ms(),
                          valid_for_ms=3_600_000)
    try:
        yield connection
    finally:
        await connection.aclose()


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, log: Path | None = None) -> Any:
    """Poll `predicate` every second until it returns something truthy (returned); else fail naming `what`
    (with the tail of `log`, when given)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    tail = log.read_text()[-3000:] if log else ""
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{tail}")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real `prefect server start` (all services: scheduler, triggers, actions, unlike the harness) on a fresh
    SQLite database, with prefect.yaml deployed and make up's automations; yields the env for clients."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", TRADING_APP_DIR=str(REPO_ROOT))
    log = (home / "server.log").open("w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "prefect server exited"
            try:
                with urllib.request.urlopen(env["PREFECT_API_URL"] + "/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "prefect server did not become healthy"
                time.sleep(0.5)
        prefect_cli(env, "work-pool", "create", "local", "--type", "process", "--overwrite")
        prefect_cli(env, "--no-prompt", "deploy", "--all")
        subprocess.run([sys.executable, "-m", "deployments.automations"], env=env, cwd=REPO_ROOT, check=True,
                       capture_output=True, timeout=120)
        yield env
    finally:
        stop_process(server, timeout_s=15)
        log.close()


def prefect_cli(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def prefect_client(env: dict[str, str]) -> SyncPrefectClient:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return get_client(sync_client=True)
