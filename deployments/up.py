"""`make up`: the whole stack on one machine with embedded defaults; Ctrl-C or SIGTERM stops it.

Today it brings up what exists: Redis (`REDIS_URL`, or an embedded redis-server) and, when no
Bitvavo credentials are configured, the local Bitvavo simulator. The Prefect server, worker,
deployments and loops arrive with later issues and are listed as "not yet".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from trading.config import ConfigError, Settings
from trading.processes import stop_process
from trading.redis_conn import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
NOT_YET = ("Prefect server + worker + deployments", "ingest loops", "signal engine", "trading core",
           "executor", "PnL orchestrator", "maintenance + preflight")


def _start_simulator(port: int) -> tuple[subprocess.Popen[str], str, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "trading.sim", "--port", str(port)], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert process.stdout is not None
    rest = ws = ""
    deadline = time.monotonic() + 30
    while not (rest and ws):
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the simulator did not start; run `python -m trading.sim` to see why")
            continue
        name, _, value = line.strip().partition("=")
        if name == "REST_URL":
            rest = value
        elif name == "WS_URL":
            ws = value
    # Keep draining its output so it never blocks on a full pipe.
    threading.Thread(target=_drain, args=(process.stdout,), daemon=True).start()
    return process, rest, ws


def _drain(stream: IO[str]) -> None:
    for _line in stream:
        pass


def main() -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    redis_server: EmbeddedRedis | None = None
    simulator: subprocess.Popen[str] | None = None
    try:
        if settings.redis_url:
            redis_url = settings.redis_url
        else:
            redis_server = EmbeddedRedis(data_dir=ROOT / "var" / "redis")
            redis_server.data_dir.mkdir(parents=True, exist_ok=True)
            redis_server.start()
            redis_url = redis_server.url
        lines = [f"redis      {redis_url}" + ("  (embedded, data in var/redis)" if redis_server else "")]
        if settings.has_credentials:
            lines.append(f"exchange   {settings.bitvavo_rest_url}  (credentials configured)")
        else:
            simulator, rest, ws = _start_simulator(int(os.environ.get("SIM_PORT", "8642")))
            lines.append(f"exchange   simulator REST {rest}  WebSocket {ws}  (no credentials: sim mode)")
        lines.append(f"mode       {'dry-run' if settings.dry_run else 'LIVE (gated)'}")
        lines += [f"not yet    {part}" for part in NOT_YET]
        print("\n".join(lines), flush=True)
        print("running; Ctrl-C to stop", flush=True)
        stop.wait()
        print("stopping...", flush=True)
        return 0
    finally:
        if simulator is not None:
            stop_process(simulator, timeout_s=10)
        if redis_server is not None:
            redis_server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
