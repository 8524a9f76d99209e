"""Scale-out (docs/scale-out.md): a Prefect server on PostgreSQL, a deployment, a run through a worker.

Runs where PostgreSQL answers on 127.0.0.1:5432 with trust auth (the CI machines); skips with
the reason elsewhere. The test makes its own database and drops it afterwards, and stops the
server and the worker it starts by PID.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from trading.processes import free_port, stop_process

PG_HOST, PG_PORT = "127.0.0.1", 5432
PROJECT = Path(__file__).parent / "prefect_project"
BIN = Path(sys.executable).parent


def _postgres_reachable() -> bool:
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=1):
            return True
    except OSError:
        return False



async def _admin(sql: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user="postgres", database="postgres")
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@pytest.fixture
def postgres_database() -> Iterator[str]:
    if not _postgres_reachable():
        pytest.skip(f"no PostgreSQL on {PG_HOST}:{PG_PORT}; the scale-out test needs one (CI machines have it)")
    name = f"prefect_scaleout_{secrets.token_hex(4)}"
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # e.g. password auth instead of trust: say why we skip
        pytest.skip(f"cannot create a database on {PG_HOST}:{PG_PORT} as postgres: {exc}")
    try:
        yield name
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _wait_healthy(api_url: str, server: subprocess.Popen[str], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, "the Prefect server exited"
        try:
            with urllib.request.urlopen(api_url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError("the Prefect server on PostgreSQL did not become healthy")


def test_prefect_server_on_postgres_runs_a_deployment_through_a_worker(postgres_database: str,
                                                                       tmp_path: Path) -> None:
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api_url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_DATABASE_CONNECTION_URL=f"postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/"
                                                      f"{postgres_database}")
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    worker: subprocess.Popen[str] | None = None
    try:
        _wait_healthy(api_url, server)

        def prefect(*args: str) -> str:
            result = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=PROJECT, text=True,
                                    capture_output=True, timeout=120)
            assert result.returncode == 0, result.stdout + result.stderr
            return result.stdout

        prefect("work-pool", "create", "pg-pool", "--type", "process")
        prefect("--no-prompt", "deploy", "hello.py:hello", "--name", "hello-pg", "--pool", "pg-pool")
        created = prefect("deployment", "run", "scale-out-hello/hello-pg", "--param", "value=41")
        assert "Created flow run" in created
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "pg-pool"], env=env,
                                  cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        state = ""
        while time.monotonic() < deadline and state != "COMPLETED":
            time.sleep(2)
            state = asyncio.run(_run_state(postgres_database))
        assert state == "COMPLETED", f"flow run state in PostgreSQL: {state or 'no run'}"
    finally:
        if worker is not None:
            stop_process(worker, timeout_s=15)
        stop_process(server, timeout_s=15)
        log.close()


async def _run_state(database: str) -> str:
    """The flow run's state as the server stored it: proof the server really used PostgreSQL."""
    import asyncpg

    connection = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user="postgres", database=database)
    try:
        row = await connection.fetchrow("SELECT state_type FROM flow_run ORDER BY created DESC LIMIT 1")
    finally:
        await connection.close()
    return str(row["state_type"]) if row else ""
