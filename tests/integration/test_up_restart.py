"""`make up` comes back after any stop: `python -m deployments.up` on its own ports and var/ dir, started,
stopped with SIGINT to its process group (a terminal's Ctrl-C, twice), started again, killed with
SIGKILL, started again; every time all loops run again and `bitvavo:book` grows within 3 minutes.
The Prefect CLI run from a folder with the project's prefect.toml (its port set to this stack's)
and no PREFECT_API_URL talks to the stack's server. Every process the stack started is stopped in
`finally`, also those a killed supervisor left: they carry this test's TRADING_VAR_DIR."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import FlowRun, StateType

from tests.integration.conftest import REPO_ROOT, wait_until
from trading.processes import free_port

BIN = Path(sys.executable).parent
LOOPS = {d["name"] for d in yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
         if "long-running" in d.get("tags", [])}
RUNNING_WITHIN_S = 180
pytestmark = pytest.mark.timeout(720)  # three starts and two stops of the whole stack (~5 min on 2 cores)




def _ours(var: Path) -> list[int]:
    """The pids of every process the stack under test started (they inherit its TRADING_VAR_DIR)."""
    marker = f"TRADING_VAR_DIR={var}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _kill_sessions(pids: list[int]) -> None:
    for sid in {os.getsid(pid) for pid in pids if _alive(pid)} - {os.getsid(0)}:
        for pid in pids:
            if _alive(pid) and os.getsid(pid) == sid:
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return os.getsid(pid) >= 0
    except ProcessLookupError:
        return False


class Stack:
    def __init__(self, tmp_path: Path) -> None:
        self.var = tmp_path / "var"
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PREFECT_API_URL")}
        self.env.update(TRADING_VAR_DIR=str(self.var), PREFECT_HOME=str(self.var / "prefect"),
                        PARQUET_DIR=str(tmp_path / "lake"), PREFECT_PORT=str(self.port), REDIS_PORT=str(redis_port),
                        SIM_PORT=str(free_port()), PREFECT_WORKER_QUERY_SECONDS="2",
                        PREFECT_SERVER_ANALYTICS_ENABLED="false")
        self.log = tmp_path / "up.log"
        self.supervisor: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start the supervisor in a session of its own (its group is the 'terminal's'); returns the
        seconds until every loop runs and the book grows."""
        started = time.monotonic()
        self.log.write_text("")
        with self.log.open("ab") as out:
            self.supervisor = subprocess.Popen([sys.executable, "-m", "deployments.up"], cwd=REPO_ROOT, env=self.env,
                                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: "running; Ctrl-C to stop" in self.log.read_text() or self.supervisor.poll() is not None,  # type: ignore[union-attr]
              240, "make up to start", self.log)
        assert self.supervisor.poll() is None, self.log.read_text()[-3000:]
        with self.client() as client:
            wait_until(lambda: self.running_loops(client) == LOOPS, RUNNING_WITHIN_S, "every loop Running", self.log)
        store = redis.Redis.from_url(self.redis_url)
        try:
            first = int(store.xlen("bitvavo:book"))
            wait_until(lambda: int(store.xlen("bitvavo:book")) > first, 60, "bitvavo:book to grow", self.log)
        finally:
            store.close()
        return time.monotonic() - started

    def client(self) -> SyncPrefectClient:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.api_url}):
            return get_client(sync_client=True)

    def active_runs(self, client: SyncPrefectClient) -> list[FlowRun]:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING, StateType.CANCELLING]))))

    def running_loops(self, client: SyncPrefectClient) -> set[str]:
        names = {d.id: d.name for d in client.read_deployments()}
        return {names[r.deployment_id] for r in self.active_runs(client)
                if r.state_type == StateType.RUNNING and names.get(r.deployment_id) in LOOPS}


@pytest.fixture
def stack(tmp_path: Path) -> Any:
    handle = Stack(tmp_path)
    try:
        yield handle
    finally:
        if handle.supervisor is not None and handle.supervisor.poll() is None:
            handle.supervisor.kill()
            handle.supervisor.wait(timeout=10)
        for _attempt in range(3):  # what a killed supervisor leaves, by the sessions it gave them
            left = _ours(handle.var)
            if not left:
                break
            _kill_sessions(left)
            time.sleep(1)
        assert not _ours(handle.var), "processes of the stack survived the test"


def test_make_up_restarts_every_loop_after_ctrl_c_and_after_kill_9(stack: Stack, tmp_path: Path) -> None:
    timings = {"first start": stack.start()}

    # The Prefect CLI from a folder with the project's prefect.toml, no PREFECT_API_URL: the stack's server.
    project_toml = tomllib.loads((REPO_ROOT / "prefect.toml").read_text())
    assert project_toml["api"]["url"] == "http://127.0.0.1:4200/api"  # make up's default PREFECT_PORT
    folder = tmp_path / "operator"
    folder.mkdir()
    (folder / "prefect.toml").write_text((REPO_ROOT / "prefect.toml").read_text().replace(":4200/", f":{stack.port}/"))
    cli_env = {k: v for k, v in stack.env.items() if k != "PREFECT_API_URL"}
    listed = subprocess.run([str(BIN / "prefect"), "deployment", "ls"], cwd=folder, env=cli_env, capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "ingest-orderbook" in listed.stdout and "pnl-orchestrator" in listed.stdout, listed.stdout

    # Ctrl-C in the terminal: SIGINT to the supervisor's process group, and an impatient second one.
    assert stack.supervisor is not None
    stopping = time.monotonic()
    os.killpg(stack.supervisor.pid, signal.SIGINT)
    time.sleep(1)
    os.killpg(stack.supervisor.pid, signal.SIGINT)
    assert stack.supervisor.wait(timeout=150) == 0, stack.log.read_text()[-3000:]
    timings["stop after Ctrl-C"] = time.monotonic() - stopping
    assert not _ours(stack.var), "the stop left processes running"
    assert "loops cancelled:" in stack.log.read_text()

    timings["restart after Ctrl-C"] = stack.start()

    os.kill(stack.supervisor.pid, signal.SIGKILL)  # the supervisor dies; what it started keeps running
    stack.supervisor.wait(timeout=10)
    assert _ours(stack.var)
    timings["restart after kill -9"] = stack.start()
    log = stack.log.read_text()
    assert "leftovers  stopped what a killed make up left running" in log, log[-3000:]
    with stack.client() as client:
        crashed = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.CRASHED]))))
        assert any((run.state.message or "").startswith("make up:") for run in crashed if run.state), log[-3000:]
        duplicates = [run.name for run in client.read_flow_runs(limit=200)
                      if run.state and run.state.message == "Deployment concurrency limit reached."]
    print("make up timings: " + ", ".join(f"{name} {seconds:.0f}s" for name, seconds in timings.items())
          + f"; runs cancelled as duplicates: {len(duplicates)}")
