"""`make up`: the whole stack on one machine with embedded defaults; Ctrl-C or SIGTERM stops it.

In order: Redis (`REDIS_URL`, or an embedded redis-server with its data in var/redis); the
Bitvavo simulator when no credentials are configured; the Prefect server on 127.0.0.1 with
SQLite in var/prefect (reused when one already answers); the `local` process work pool; the
blocks; `prefect deploy --all`; the automations; a worker. Everything runs in dry-run unless
the environment says otherwise. Every step is idempotent: running it again creates nothing twice.

`PREFECT_SERVER_ENCRYPTION_KEY` is generated once into var/secrets (mode 0600), outside the
Prefect database, so a backup of prefect.db holds no usable secret.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from cryptography.fernet import Fernet

from trading.config import ConfigError, Settings, mask_url_password
from trading.processes import stop_process
from trading.redis_conn import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
VAR = ROOT / "var"
BIN = Path(sys.executable).parent
PREFECT_PORT = int(os.environ.get("PREFECT_PORT", "4200"))
WORKER_LIMIT = 16  # seven loops + scheduled and ops flows, with room
WORKER_CANCEL_GRACE_S = 12  # the worker polls for cancellations every 10 s


def _child(args: Sequence[str], env: dict[str, str], log: Path | None = None) -> subprocess.Popen[str]:
    """A child with default signal dispositions (a worker that inherits SIGINT=ignored ignores SIGTERM)."""
    out: IO[str] | int = open(log, "a") if log else subprocess.PIPE  # noqa: SIM115 - lives as long as the child
    return subprocess.Popen(list(args), cwd=ROOT, env=env, text=True, stdout=out, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _start_simulator(port: int, env: dict[str, str]) -> tuple[subprocess.Popen[str], str, str]:
    process = _child([sys.executable, "-m", "trading.sim", "--port", str(port)], env)
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
    threading.Thread(target=_drain, args=(process.stdout,), daemon=True).start()  # never block on a full pipe
    return process, rest, ws


def _drain(stream: IO[str]) -> None:
    for _line in stream:
        pass


def _encryption_key() -> str:
    """The Fernet key for block secrets, created once and kept outside the Prefect database."""
    path = VAR / "secrets" / "prefect-encryption-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(Fernet.generate_key().decode())
    return path.read_text().strip()


def _api_healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(api_url + "/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait_healthy(api_url: str, server: subprocess.Popen[str], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not _api_healthy(api_url):
        if server.poll() is not None:
            raise RuntimeError(f"the Prefect server exited ({server.returncode}); see var/log/prefect-server.log")
        if time.monotonic() > deadline:
            raise RuntimeError("the Prefect server did not become healthy; see var/log/prefect-server.log")
        time.sleep(0.5)


def _prefect(env: dict[str, str], *args: str) -> None:
    result = subprocess.run([str(BIN / "prefect"), *args], cwd=ROOT, env=env, text=True, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"`prefect {' '.join(args)}` failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def _python(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, text=True, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"`python {' '.join(args)}` failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result.stdout.strip()


def _register_blocks(env: dict[str, str], redis_url: str, settings: Settings) -> None:
    for module in ("blocks.credentials", "blocks.lake", "prefect_redis"):
        _prefect(env, "block", "register", "-m", module)
    # Non-secret defaults: the lake settings and the Redis the stack uses.
    _python(env, "-c", "import sys; from blocks.lake import LakeSettings; "
            "LakeSettings(parquet_dir=sys.argv[1], backup_dir=sys.argv[2]).save('default', overwrite=True)",
            str(settings.parquet_dir), str(VAR / "backups"))
    _python(env, "-c", "import sys; from prefect_redis import RedisDatabase; "
            "RedisDatabase.from_connection_string(sys.argv[1]).save('default', overwrite=True)", redis_url)
    if (ROOT / ".env.bitvavo").exists():
        print(_python(env, "-m", "blocks.import_env", str(ROOT / ".env.bitvavo")), flush=True)


def main() -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    (VAR / "log").mkdir(parents=True, exist_ok=True)
    redis_server: EmbeddedRedis | None = None
    children: list[subprocess.Popen[str]] = []  # stopped in reverse order
    worker: subprocess.Popen[str] | None = None
    env = dict(os.environ)
    try:
        if settings.redis_url:
            redis_url = settings.redis_url
        else:
            redis_server = EmbeddedRedis(data_dir=VAR / "redis")
            redis_server.data_dir.mkdir(parents=True, exist_ok=True)
            redis_server.start()
            redis_url = redis_server.url
        api_url = os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{PREFECT_PORT}/api"
        env = dict(os.environ, REDIS_URL=redis_url, TRADING_APP_DIR=str(ROOT),
                   PARQUET_DIR=str(settings.parquet_dir.resolve()), PREFECT_API_URL=api_url,
                   PREFECT_HOME=os.environ.get("PREFECT_HOME", str(VAR / "prefect")),
                   PREFECT_SERVER_ENCRYPTION_KEY=os.environ.get("PREFECT_SERVER_ENCRYPTION_KEY") or _encryption_key(),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_API_HOST="127.0.0.1",
                   PREFECT_SERVER_API_PORT=str(PREFECT_PORT))
        lines = [f"redis      {mask_url_password(redis_url)}" + ("  (embedded, data in var/redis)" if redis_server
                                                                 else "")]
        if settings.has_credentials or (ROOT / ".env.bitvavo").exists():
            lines.append(f"exchange   {settings.bitvavo_rest_url}  (credentials configured)")
        else:
            simulator, rest, ws = _start_simulator(int(os.environ.get("SIM_PORT", "8642")), env)
            children.append(simulator)
            env.update(BITVAVO_REST_URL=rest, BITVAVO_WS_URL=ws)
            lines.append(f"exchange   simulator REST {rest}  WebSocket {ws}  (no credentials: sim mode)")
        if _api_healthy(api_url):
            lines.append(f"prefect    {api_url}  (already running, reused)")
        else:
            server = _child([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                             str(PREFECT_PORT)], env, VAR / "log" / "prefect-server.log")
            children.append(server)
            print("starting the Prefect server (first start migrates its database: ~20 s)...", flush=True)
            _wait_healthy(api_url, server)
            lines.append(f"prefect    {api_url}  (SQLite in {env['PREFECT_HOME']})")
        _prefect(env, "work-pool", "create", "local", "--type", "process", "--overwrite")
        _register_blocks(env, redis_url, settings)
        _prefect(env, "--no-prompt", "deploy", "--all")
        automations = _python(env, "-m", "deployments.automations")
        worker = _child([str(BIN / "prefect"), "worker", "start", "--pool", "local", "--limit", str(WORKER_LIMIT)],
                        env, VAR / "log" / "prefect-worker.log")
        children.append(worker)
        loops = _python(env, "-m", "deployments.loops")
        lines += ["pool       local (process), worker started (log var/log/prefect-worker.log)",
                  "deployed   every deployment in prefect.yaml (prefect deploy --all)",
                  f"           {automations}",
                  f"           {loops}",
                  f"mode       {'dry-run' if settings.dry_run else 'LIVE (gated by go-live + kill switch)'}",
                  f"UI         {api_url.removesuffix('/api')}"]
        print("\n".join(lines), flush=True)
        print("running; Ctrl-C to stop", flush=True)
        stop.wait()
        print("stopping...", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"make up failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if worker is not None and worker.poll() is None:
            # Cancelled (not crashed) runs are not restarted by their triggers; the worker then stops them.
            with contextlib.suppress(RuntimeError):
                print(_python(env, "-m", "deployments.loops", "cancel"), flush=True)
                time.sleep(WORKER_CANCEL_GRACE_S)
        for child in reversed(children):  # worker, server, simulator
            stop_process(child, timeout_s=15)
        if redis_server is not None:
            redis_server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
