"""Flatten against the simulator: open orders cancelled, positions sold at market, kill switch on, audited."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from flows.ops import flatten
from tests.integration.conftest import SimHandle
from trading.bus import KEY_KILL
from trading.decimals import parse_decimal
from trading.events import read_events
from trading.exchange.rest import BitvavoRest
from trading.redis_conn import async_client

pytestmark = pytest.mark.usefixtures("prefect_api")


def _env(monkeypatch: pytest.MonkeyPatch, sim: SimHandle, redis_url: str, lake: Path, *, live: bool) -> None:
    values = {"REDIS_URL": redis_url, "PARQUET_DIR": str(lake), "BITVAVO_REST_URL": sim.rest_url,
              "BITVAVO_WS_URL": sim.ws_url, "INGEST_MARKETS": "BTC-EUR,ETH-EUR", "BITVAVO_OPERATOR_ID": "7",
              "DRY_RUN": "false" if live else "true"}
    if live:
        values |= {"BITVAVO_API_KEY": sim.api_key, "BITVAVO_API_SECRET": sim.api_secret}
    for name, value in values.items():
        monkeypatch.setenv(name, value)


async def test_live_flatten_cancels_orders_sells_positions_and_leaves_the_kill_switch_on(
        sim_factory: Callable[..., SimHandle], redis_db_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    sim = sim_factory(markets="BTC-EUR,ETH-EUR")
    _env(monkeypatch, sim, redis_db_url, tmp_path, live=True)
    rest = BitvavoRest(sim.rest_url, api_key=SecretStr(sim.api_key), api_secret=SecretStr(sim.api_secret),
                       operator_id=7)
    try:
        resting = rest.place_order("BTC-EUR", "buy", "limit", amount=Decimal("0.01"), price=Decimal("1000"))
        assert [o.order_id for o in rest.open_orders()] == [resting.order_id]
        summary = await flatten(operator="alice", reason="drill", close_positions=True)
        assert rest.open_orders() == []
        balances = {row["symbol"]: parse_decimal(row["available"]) for row in rest.balance()}
    finally:
        rest.close()
    assert {row["market"] for row in summary["sold"]} == {"BTC-EUR", "ETH-EUR"}
    assert balances["BTC"] < Decimal("0.0001") and balances["ETH"] < Decimal("0.001")  # only dust is left
    client = async_client(redis_db_url)
    try:
        assert await client.get(KEY_KILL) == "1"
        flattened = [e for e in await read_events(client) if e["type"] == "flatten"]
    finally:
        await client.aclose()
    assert len(flattened) == 1 and flattened[0]["detail"]["operator"] == "alice"


async def test_dry_run_flatten_only_switches_the_kill_switch_on(sim: SimHandle, redis_db_url: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, sim, redis_db_url, tmp_path, live=False)
    summary = await flatten(operator="bob", reason="test", close_positions=True)
    assert summary["mode"].startswith("no credentials") and summary["sold"] == []
    assert redis.Redis.from_url(redis_db_url, decode_responses=True).get(KEY_KILL) == "1"


async def test_flatten_needs_an_operator_and_a_reason(redis_db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_db_url)
    with pytest.raises(ValueError, match="operator and reason are required"):
        await flatten(operator=" ", reason="")
