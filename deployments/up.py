"""`make up`: the whole stack on one machine with embedded defaults, stopped cleanly by any stop signal.

In order: Redis (`REDIS_URL`, or an embedded redis-server on 127.0.0.1:`REDIS_PORT`, default
6390, data in var/redis); the Bitvavo simulator on `SIM_PORT` (8642) when no credentials are
configured; the Prefect server on 127.0.0.1:`PREFECT_PORT` (4200) with SQLite in var/prefect
(reused when one already answers); the `local` process work pool; the blocks; `prefect deploy
--all` (only when prefect.yaml or a flow changed, so the restart triggers keep their state); the
automations (created once, kept); the loop runs nothing executes any more ended
(`deployments.loops reconcile`); a worker named `make-up@<host>`; every loop without a live run
started. Everything runs in dry-run unless the environment says otherwise. Running it again
creates nothing twice. `TRADING_VAR_DIR` moves var/ (state, logs, data) elsewhere.

Stopping: Ctrl-C (SIGINT to the terminal's process group), SIGTERM and SIGHUP take one path:
cancel the loops' runs and wait for them (bounded), then stop the worker, the server, the
simulator and Redis. Every child runs in its own session, so a terminal's signal reaches only
this supervisor, which stops them in that order; a second Ctrl-C does not cut the stop short.
One supervisor per var/ (a lock); var/run/up.json names the children it started, so the next
`make up` after a supervisor was killed (kill -9) first stops what it left running.

`PREFECT_SERVER_ENCRYPTION_KEY` is generated once into var/secrets (mode 0600), outside the
Prefect database, so a backup of prefect.db holds no usable secret.

The embedded Redis gets one ACL user per loop and operator flow (trading/redis_acl.py), reset to
the role table at every start; their passwords are generated once into var/secrets/redis-users.json
(mode 0600) and saved in the `redis-<role>` RedisDatabase blocks. The default user stays open on
127.0.0.1 for make up itself, the tests and flows not yet reading their role's block. With
`REDIS_URL` set no user is created: docs/scale-out.md shows the same users on a managed Redis.

Notifications: with `NOTIFY_URL` (an http(s) URL; checked before anything starts) the automations
step saves the notification block and the `notify-*` automations; without it removes them
(deployments/automations.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import urlsplit

from cryptography.fernet import Fernet

from trading import redis_acl
from trading.config import ConfigError, Settings, mask_url_password
from trading.redis_conn import EmbeddedRedis, RedisUnavailableError, sync_client

ROOT = Path(__file__).resolve().parents[1]
VAR = Path(os.environ.get("TRADING_VAR_DIR") or ROOT / "var").resolve()
STATE = VAR / "run" / "up.json"
REDIS_USERS = VAR / "secrets" / "redis-users.json"  # role -> password of the embedded Redis's ACL users
BIN = Path(sys.executable).parent
PREFECT_PORT = int(os.environ.get("PREFECT_PORT", "4200"))  # prefect.toml points the CLI here
REDIS_PORT = int(os.environ.get("REDIS_PORT", "6390"))  # not 6379: a system Redis may be there
SIM_PORT = int(os.environ.get("SIM_PORT", "8642"))
WORKER_NAME = f"make-up@{socket.gethostname()}"
WORKER_LIMIT = 16  # eight loops + scheduled and ops flows, with room
LOOPS_STOP_S = 40  # loops end within 10 s of their cancel; the worker passes a cancel on within ~10 s
CHILD_STOP_S = 20
FINGERPRINTED = ("prefect.yaml", "flows/*.py")  # what a deployment is made from (parameter schemas)

stop = threading.Event()


class Interrupted(Exception):
    """A stop signal arrived while the stack was starting."""


def _say(text: str) -> None:
    with contextlib.suppress(OSError):  # a hung-up terminal (SIGHUP) must not break the stop path
        print(text, flush=True)


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    if stop.is_set():
        with contextlib.suppress(OSError):  # never print() here: it may interrupt a print
            os.write(2, b"already stopping (loops first, then worker, server, simulator, Redis); it is bounded\n")
    stop.set()


class Children:
    """The processes this supervisor started, each in its own session, recorded in var/run/up.json."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen[str]]] = []

    def start(self, name: str, args: Sequence[str], env: dict[str, str], log: Path | None = None
              ) -> subprocess.Popen[str]:
        out: IO[str] | int = open(log, "a") if log else subprocess.PIPE  # noqa: SIM115 - lives as long as the child
        process = subprocess.Popen(list(args), cwd=ROOT, env=env, text=True, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        self.started.append((name, process))
        self._record()
        return process

    def has(self, name: str) -> bool:
        return any(started == name for started, _process in self.started)

    def _record(self) -> None:
        children = [{"name": name, "pid": p.pid, "started": _started(p.pid)} for name, p in self.started]
        STATE.parent.mkdir(parents=True, exist_ok=True)
        temporary = STATE.with_suffix(".tmp")
        temporary.write_text(json.dumps({"supervisor": os.getpid(), "children": children}))
        temporary.replace(STATE)

    def stop_all(self) -> None:
        """Newest first (worker, server, simulator, Redis), each with whatever it started."""
        for name, process in reversed(self.started):
            stop_tree(process.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=1)  # reap
            _say(f"stopped {name}")
        STATE.unlink(missing_ok=True)


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from its state field on (index 1: the parent, 19: the start time); None once exited."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields


def _started(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, it names one process for good."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def _descendants(pid: int) -> list[int]:
    parent_of: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            parent_of[int(entry.name)] = int(fields[1])
    found: list[int] = []
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parent_of.items() if parent in frontier}
        found += frontier
    return found


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        group = os.getpgid(pid)
        if group != os.getpgrp():
            os.killpg(group, signum)


def stop_tree(pid: int, timeout_s: float = CHILD_STOP_S) -> None:
    """SIGTERM the process group of `pid`, wait, then SIGKILL the groups of it and of every descendant
    still alive (a flow run's process has a session of its own and can outlive its worker)."""
    tree = [pid, *_descendants(pid)]
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(_stat(member) for member in tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    for member in tree:
        if _stat(member):
            _signal_group(member, signal.SIGKILL)


def stop_leftovers() -> list[str]:
    """Stop what a previous supervisor recorded and left running (it was killed); newest first."""
    try:
        recorded: dict[str, Any] = json.loads(STATE.read_text())
    except (OSError, ValueError):
        return []
    stopped: list[str] = []
    for child in reversed(recorded.get("children", [])):
        pid = int(child.get("pid") or 0)
        if pid <= 0 or child.get("started") is None or _started(pid) != child["started"]:
            continue  # gone, or the pid now names another process
        stop_tree(pid)
        stopped.append(f"{child['name']} (pid {pid})")
    STATE.unlink(missing_ok=True)
    return stopped


def _run(env: dict[str, str], args: Sequence[str], *, interruptible: bool = True, timeout_s: float = 300) -> str:
    """A helper command in its own session (a second Ctrl-C cannot kill the stop path's helpers); while
    starting, a stop signal ends it and raises `Interrupted`."""
    process = subprocess.Popen(list(args), cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            out, err = process.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if (interruptible and stop.is_set()) or time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                if interruptible and stop.is_set():
                    raise Interrupted from None
                raise RuntimeError(f"`{' '.join(args[1:])}` did not finish in {timeout_s:.0f}s") from None
    if process.returncode != 0:
        raise RuntimeError(f"`{' '.join(args[1:])}` failed:\n{out[-2000:]}{err[-2000:]}")
    return out.strip()


def _prefect(env: dict[str, str], *args: str) -> str:
    return _run(env, [str(BIN / "prefect"), *args])


def _python(env: dict[str, str], *args: str, interruptible: bool = True) -> str:
    return _run(env, [sys.executable, *args], interruptible=interruptible)


def _announced(process: subprocess.Popen[str], what: str, names: set[str], timeout_s: float = 30) -> dict[str, str]:
    """The `NAME=value` lines a child prints once it serves; its later output is drained."""
    assert process.stdout is not None
    values: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while not names <= set(values):
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {what} did not start (exit {process.poll()})")
            continue
        name, _, value = line.strip().partition("=")
        values[name] = value
    threading.Thread(target=_drain, args=(process.stdout,), daemon=True).start()  # never block on a full pipe
    return values


def _drain(stream: IO[str]) -> None:
    for _line in stream:
        pass


def keep_redis(port: int, data_dir: Path) -> int:
    """`python -m deployments.up --embedded-redis PORT DIR`: EmbeddedRedis in this process's session
    (the supervisor's child), persisted in DIR, until SIGTERM; prints `REDIS_URL=...` once it answers."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = EmbeddedRedis(data_dir=data_dir, port=port)
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        server.start()
        print(f"REDIS_URL={server.url}", flush=True)
        while True:
            signal.pause()
    except RedisUnavailableError as exc:
        print(f"ERROR={exc} (REDIS_PORT={port}: is another Redis there?)", flush=True)
        return 1
    finally:
        server.stop()


def _start_redis(children: Children, env: dict[str, str]) -> str:
    keeper = children.start("redis", [sys.executable, "-m", "deployments.up", "--embedded-redis", str(REDIS_PORT),
                                      str(VAR / "redis")], env)
    try:
        return _announced(keeper, "embedded Redis", {"REDIS_URL"}, timeout_s=20)["REDIS_URL"]
    except RuntimeError:
        raise RuntimeError(f"the embedded Redis did not start on 127.0.0.1:{REDIS_PORT} (REDIS_PORT): "
                           "is another Redis or a leftover redis-server there?") from None


def _redis_users(redis_url: str, settings: Settings) -> str:
    """Create (or reset to the table) one ACL user per role on the embedded Redis; say how strict they are."""
    passwords = redis_acl.load_or_create_passwords(REDIS_USERS)
    client = sync_client(redis_url)
    try:
        selectors = redis_acl.apply(client, passwords, signal_stream=settings.signal_stream)
        version = client.info("server")["redis_version"]
    finally:
        client.close()
    strictness = ("per-key commands (selectors)" if selectors else
                  "keys and commands, not per key: Redis < 7 has no selectors (docs/scale-out.md)")
    return (f"           ACL users {', '.join(sorted(passwords))} on Redis {version}: {strictness}; "
            f"passwords in {REDIS_USERS} and the redis-<role> blocks")


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
        if stop.is_set():
            raise Interrupted
        if server.poll() is not None:
            raise RuntimeError(f"the Prefect server exited ({server.returncode}); see {VAR}/log/prefect-server.log")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Prefect server did not become healthy; see {VAR}/log/prefect-server.log")
        time.sleep(0.5)


def fingerprint() -> str:
    """What the deployments are made from: prefect.yaml, the flows (parameter schemas), the checkout's path."""
    digest = hashlib.sha256(str(ROOT).encode())
    for path in sorted(p for pattern in FINGERPRINTED for p in ROOT.glob(pattern)):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return "make-up-" + digest.hexdigest()[:12]


# One RedisDatabase block per role, read from the passwords file (never a command-line argument).
_ROLE_BLOCKS = """
import json, sys
from urllib.parse import urlsplit
from prefect_redis import RedisDatabase
url = urlsplit(sys.argv[1])
with open(sys.argv[2]) as handle:
    passwords = json.load(handle)
for role, password in passwords.items():
    RedisDatabase(host=url.hostname, port=url.port, db=int(url.path.strip('/') or 0), username=role,
                  password=password).save('redis-' + role, overwrite=True)
"""


def _register_blocks(env: dict[str, str], redis_url: str, settings: Settings) -> None:
    for module in ("blocks.credentials", "blocks.lake", "prefect_redis"):
        _prefect(env, "block", "register", "-m", module)
    # Non-secret defaults: the lake settings and the Redis the stack uses.
    # backup_dir and archive_dir stay unset: beside the lake (blocks/lake.py), one source of truth.
    _python(env, "-c", "import sys; from blocks.lake import LakeSettings; "
            "LakeSettings(parquet_dir=sys.argv[1]).save('default', overwrite=True)",
            str(settings.parquet_dir))
    _python(env, "-c", "import sys; from prefect_redis import RedisDatabase; "
            "RedisDatabase.from_connection_string(sys.argv[1]).save('default', overwrite=True)", redis_url)
    if not settings.redis_url:  # the embedded Redis, whose users make up created
        _python(env, "-c", _ROLE_BLOCKS, redis_url, str(REDIS_USERS))
    if (ROOT / ".env.bitvavo").exists():
        _say(_python(env, "-m", "blocks.import_env", str(ROOT / ".env.bitvavo")))


def _operator_lines(api_url: str, redis_url: str) -> list[str]:
    """The one line each to reach Prefect and Redis from a shell (prefect.toml covers the default port)."""
    toml_url = tomllib.loads((ROOT / "prefect.toml").read_text())["api"]["url"]
    override = "" if api_url == toml_url else f"PREFECT_API_URL={api_url} "
    redis_cli = shutil.which("redis-cli") or "redis-cli"
    return [f"CLI        cd {ROOT} && {override}.venv/bin/prefect deployment ls",
            f"           {redis_cli} -u {mask_url_password(redis_url)} xlen bitvavo:book"]


def _start(settings: Settings, children: Children, env: dict[str, str]) -> None:
    """Bring the stack up, filling `env` (the children's environment, which the stop path needs too)."""
    leftovers = stop_leftovers()
    lines = [f"leftovers  stopped what a killed make up left running: {', '.join(leftovers)}"] if leftovers else []
    api_url = os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{PREFECT_PORT}/api"
    env.update(os.environ, TRADING_APP_DIR=str(ROOT), PARQUET_DIR=str(settings.parquet_dir.resolve()),
               PREFECT_API_URL=api_url, PREFECT_HOME=os.environ.get("PREFECT_HOME", str(VAR / "prefect")),
               PREFECT_SERVER_ENCRYPTION_KEY=os.environ.get("PREFECT_SERVER_ENCRYPTION_KEY") or _encryption_key(),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_API_HOST="127.0.0.1",
               PREFECT_SERVER_API_PORT=str(PREFECT_PORT))
    if settings.redis_url:
        redis_url = settings.redis_url
        lines.append(f"redis      {mask_url_password(redis_url)}")
    else:
        redis_url = _start_redis(children, env)
        lines.append(f"redis      {redis_url}  (embedded, REDIS_PORT={REDIS_PORT}, data in {VAR / 'redis'})")
        lines.append(_redis_users(redis_url, settings))
    env["REDIS_URL"] = redis_url
    if settings.has_credentials or (ROOT / ".env.bitvavo").exists():
        lines.append(f"exchange   {settings.bitvavo_rest_url}  (credentials configured)")
    else:
        simulator = children.start("simulator", [sys.executable, "-m", "trading.sim", "--port", str(SIM_PORT)], env)
        urls = _announced(simulator, "simulator (`python -m trading.sim` shows why)", {"REST_URL", "WS_URL"})
        env.update(BITVAVO_REST_URL=urls["REST_URL"], BITVAVO_WS_URL=urls["WS_URL"])
        lines.append(f"exchange   simulator REST {urls['REST_URL']}  WebSocket {urls['WS_URL']}  (no credentials)")
    if _api_healthy(api_url):
        lines.append(f"prefect    {api_url}  (already running, reused)")
    else:
        log = VAR / "log" / "prefect-server.log"
        server = children.start("prefect server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                                   "--port", str(PREFECT_PORT)], env, log)
        _say("starting the Prefect server (first start migrates its database: ~20 s)...")
        _wait_healthy(api_url, server)
        lines.append(f"prefect    {api_url}  (SQLite in {env['PREFECT_HOME']})")
    _prefect(env, "work-pool", "create", "local", "--type", "process", "--overwrite")
    _register_blocks(env, redis_url, settings)
    version = fingerprint()
    automations, deployments = _python(env, "-m", "deployments.automations", version).splitlines()[-2:]
    if deployments.endswith("current"):
        lines.append(f"deployed   prefect.yaml unchanged since it was deployed ({version}): triggers kept")
    else:
        _prefect(env, "--no-prompt", "deploy", "--all")
        _python(env, "-m", "deployments.automations", "--deployed", version)
        lines.append(f"deployed   every deployment in prefect.yaml ({version})")
    lines.append(f"           {automations}")
    lines.append("notify     " + ("messages to NOTIFY_URL (block trading-notify), docs/runbooks.md#notifications"
                                  if os.environ.get("NOTIFY_URL") else "off (NOTIFY_URL unset)"))
    lines.append(f"           {_python(env, '-m', 'deployments.loops', 'reconcile', WORKER_NAME)}")
    children.start("worker", [str(BIN / "prefect"), "worker", "start", "--pool", "local", "--name", WORKER_NAME,
                              "--limit", str(WORKER_LIMIT)], env, VAR / "log" / "prefect-worker.log")
    lines += [f"pool       local (process), worker {WORKER_NAME} (log {VAR}/log/prefect-worker.log)",
              f"           {_python(env, '-m', 'deployments.loops', 'start')}",
              f"mode       {'dry-run' if settings.dry_run else 'LIVE (gated by go-live + kill switch)'}",
              f"UI         {api_url.removesuffix('/api')}",
              *_operator_lines(api_url, redis_url)]
    _say("\n".join(lines))


def main() -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    notify = urlsplit(os.environ.get("NOTIFY_URL") or "http://unset")
    if notify.scheme not in ("http", "https") or not notify.hostname:
        print("NOTIFY_URL must be an http(s) URL (a Slack or Teams incoming webhook, or any JSON receiver)",
              file=sys.stderr)
        return 2
    (VAR / "run").mkdir(parents=True, exist_ok=True)
    (VAR / "log").mkdir(parents=True, exist_ok=True)
    lock = open(VAR / "run" / "up.lock", "a+")  # noqa: SIM115 - held until this process exits
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"make up is already running for {VAR} (see {STATE}); stop it first", file=sys.stderr)
        return 1
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    children = Children()
    env: dict[str, str] = {}
    try:
        _start(settings, children, env)
        _say("running; Ctrl-C to stop")
        stop.wait()
        return 0
    except Interrupted:
        return 0
    except RuntimeError as exc:
        print(f"make up failed: {exc}", file=sys.stderr)
        return 1
    finally:
        _say("stopping...")
        if children.has("worker") and _api_healthy(env["PREFECT_API_URL"]):
            try:
                _say(_python(env, "-m", "deployments.loops", "stop", str(LOOPS_STOP_S), interruptible=False))
            except RuntimeError as exc:
                _say(f"cancelling the loops failed ({exc}); the next make up ends their runs")
        children.stop_all()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--embedded-redis"]:
        raise SystemExit(keep_redis(int(sys.argv[2]), Path(sys.argv[3])))
    raise SystemExit(main())
