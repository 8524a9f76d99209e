"""Universe selection against real Redis, the simulator's REST API and a real Prefect server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import redis
import redis.asyncio

from tests.integration.conftest import SimHandle
from trading.bus import KEY_UNIVERSE, STREAM_BOOK, STREAM_TICKER24H, TICKER24H_SCHEMA, encode_entry, stream_candles
from trading.clock import now_ms
from trading.config import Settings
from trading.exchange.rest import BitvavoRest
from trading.ingest.markets import MarketSelection, select_markets
from trading.universe import (
    KEY_UNIVERSE_STATE,
    GatherStats,
    UniverseConfig,
    UniverseConflictError,
    gather_inputs,
    load_state,
    read_latest,
    run_selection,
)

MINUTE = 60_000
ZIGZAG = ("100", "101", "100", "101", "100", "101", "100")


@pytest.fixture
def client(redis_db_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_db_url, decode_responses=True)
    try:
        yield connection
    finally:
        connection.close()


def ticker(market: str, **values: str) -> dict[str, str]:
    now = now_ms()
    return encode_entry({"ts": now, "recv_ts": now, "market": market, **values})


def seed_candles(client: redis.Redis, market: str, closes: tuple[str, ...], now: int) -> None:
    """Closed 1m buckets ending with the one before the current, each sent twice (the last one wins)."""
    current = now - now % MINUTE
    for i, close in enumerate(closes):
        open_ts = current - (len(closes) - i) * MINUTE
        for price in ("1", close):
            client.xadd(stream_candles("1m"), encode_entry({
                "ts": open_ts, "recv_ts": now, "market": market, "interval": "1m", "open_ts": open_ts,
                "open": Decimal(price), "high": Decimal(close) + 1, "low": Decimal(price), "close": Decimal(price),
                "volume": Decimal("2")}))


def test_the_newest_entry_per_market_wins_even_when_malformed(client: redis.Redis) -> None:
    now = now_ms()
    client.xadd(STREAM_TICKER24H, {"v": "1", "ts": str(now - 400_000), "market": "OLD-EUR"}, id=f"{now - 400_000}-0")
    client.xadd(STREAM_TICKER24H, ticker("BTC-EUR", last="100", volumeQuote="5"))
    client.xadd(STREAM_TICKER24H, ticker("ETH-EUR", last="100", volumeQuote="5"))
    client.xadd(STREAM_TICKER24H, ticker("BTC-EUR", last="101", volumeQuote="6"))
    client.xadd(STREAM_TICKER24H, {**ticker("ETH-EUR"), "last": "NaN"})  # newest ETH row is malformed
    stats = GatherStats()
    found = read_latest(client, STREAM_TICKER24H, TICKER24H_SCHEMA, since_ms=now - 300_000, markets=None,
                        scan_limit=1000, stats=stats, page=2)
    assert set(found) == {"BTC-EUR", "ETH-EUR"}  # OLD-EUR is outside the window
    btc = found["BTC-EUR"]
    assert isinstance(btc, dict) and btc["last"] == Decimal("101") and btc["volumeQuote"] == Decimal("6")
    assert found["ETH-EUR"] == "last must be finite, got 'NaN'"
    assert stats.malformed_stream_entries == 1 and stats.stream_entries_read == 4


def test_state_survives_hand_edited_values(client: redis.Redis) -> None:
    client.hset(KEY_UNIVERSE, mapping={"BTC-EUR": json.dumps({"since": 123, "score": "1"}), "ETH-EUR": "{}",
                                       "XRP-EUR": "not json"})
    client.hset(KEY_UNIVERSE_STATE, mapping={"BTC-EUR": json.dumps({"failing_since": 77}), "SOL-EUR": "[1]"})
    state = load_state(client)
    assert state.members == {"BTC-EUR": 123, "ETH-EUR": None, "XRP-EUR": None}
    assert state.timers["BTC-EUR"].failing_since == 77 and state.timers["BTC-EUR"].qualifying_since is None
    assert state.timers["SOL-EUR"].failing_since is None


def test_candles_missing_from_the_stream_come_from_rest(client: redis.Redis, sim: SimHandle) -> None:
    now = now_ms()
    seed_candles(client, "BTC-EUR", ZIGZAG, now)
    client.xadd(stream_candles("1m"), {"v": "1", "ts": str(now - MINUTE), "market": "XRP-EUR", "open_ts": "x"})
    config = UniverseConfig(min_quote_volume_eur=Decimal(1), min_volatility_bps=Decimal(1), candle_interval="1m",
                            volatility_candles=5, min_depth_eur=Decimal(1))
    rest = BitvavoRest(sim.rest_url)
    try:
        inputs, stats = gather_inputs(client, rest, config, (), now)
    finally:
        rest.close()
    assert set(inputs) == {"BTC-EUR", "ETH-EUR", "XRP-EUR", "WMTX-EUR"}
    assert inputs["WMTX-EUR"].listing is not None and inputs["WMTX-EUR"].listing.status == "halted"
    btc, eth, xrp = inputs["BTC-EUR"], inputs["ETH-EUR"], inputs["XRP-EUR"]
    assert btc.closes == [Decimal(c) for c in ZIGZAG[-6:]] and btc.closes_source == "stream"
    assert eth.closes is not None and eth.closes_source == "rest"  # not in the stream: the simulator's history
    assert xrp.closes is None and xrp.errors["candles"].startswith("malformed candle entry: field 'open_ts'")
    assert btc.levels is not None and btc.levels.bids and btc.levels.asks
    assert stats.tickers_from_rest == 4 and stats.probed == 3  # WMTX is halted: never probed
    assert stats.malformed_stream_entries == 1
    # markets, ticker/24h, candles for ETH, a book for each probed market
    assert stats.rest_calls == 1 + 1 + 1 + 3 and stats.rest_errors == 0


def test_the_first_run_on_a_fresh_simulator_selects_markets(client: redis.Redis,
                                                           sim_factory: Callable[..., SimHandle]) -> None:
    """Nothing ingested yet and a simulator just started: its 24 h history gives every market the 48 + 1
    closed 5m candles and the 24 h volume the deployment's filters (prefect.yaml) need, so the very first
    run picks."""
    fresh = sim_factory(seed=21, markets="BTC-EUR,ETH-EUR,XRP-EUR,PEAQ-EUR")
    config = UniverseConfig(min_quote_volume_eur=Decimal(250000), max_spread_bps=Decimal(30),
                            min_volatility_bps=Decimal(5), max_volatility_bps=Decimal(500),
                            min_depth_eur=Decimal(5000), candle_interval="5m", volatility_candles=48)
    rest = BitvavoRest(fresh.rest_url)
    try:
        outcome = run_selection(client, rest, config, now_ms=now_ms())
    finally:
        rest.close()
    decision = outcome.decision
    assert {"BTC-EUR", "ETH-EUR", "XRP-EUR"} <= set(decision.universe), outcome.summary()
    assert not any(code.startswith("volatility") for code in decision.rejects), decision.rejects
    reasons = json.loads(client.hget(KEY_UNIVERSE, "BTC-EUR") or "{}")["reasons"]
    assert any(r.startswith("volatility ok:") and "over 48 5m returns (rest)" in r for r in reasons), reasons
    assert outcome.stats.tickers_from_rest == 4


async def ingest_selection(redis_url: str) -> MarketSelection:
    """What an ingest loop would record now (no INGEST_MARKETS)."""
    connection = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        return await select_markets(Settings(), connection)
    finally:
        await connection.aclose()


def test_a_write_by_someone_else_during_the_run_aborts_it(client: redis.Redis, redis_db_url: str,
                                                         sim: SimHandle) -> None:
    runner = redis.Redis.from_url(redis_db_url, decode_responses=True)
    rest = BitvavoRest(sim.rest_url)
    sim.hang_next(1, seconds=2.0)  # GET /markets hangs, then the client retries: the run is mid-way
    try:
        with ThreadPoolExecutor(1) as pool:
            run = pool.submit(run_selection, runner, rest, UniverseConfig(min_quote_volume_eur=Decimal(1)),
                              now_ms=now_ms())
            while sim.stats()["faults"]["pending_rest_faults"]:  # the run has read its state and is waiting
                time.sleep(0.05)
            client.hset(KEY_UNIVERSE, "ADA-EUR", "{}")
            with pytest.raises(UniverseConflictError, match="changed during the run; nothing written"):
                run.result(timeout=60)
    finally:
        rest.close()
        runner.close()
    assert client.hkeys(KEY_UNIVERSE) == ["ADA-EUR"] and not client.exists(KEY_UNIVERSE_STATE)


def flow_env(monkeypatch: pytest.MonkeyPatch, sim: SimHandle, redis_url: str) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("BITVAVO_REST_URL", sim.rest_url)
    monkeypatch.delenv("INGEST_MARKETS", raising=False)


FLOW_PARAMETERS: dict[str, Any] = {
    "top_n": 3, "min_quote_volume_eur": Decimal("1000000"), "max_spread_bps": Decimal("20"),
    "min_volatility_bps": Decimal("1"), "max_volatility_bps": Decimal("1000"), "candle_interval": "1m",
    "volatility_candles": 5, "min_depth_eur": Decimal("1000"), "depth_bps": Decimal("50"),
    "blacklist": ["DOGE-.*"], "min_qualify_s": 1800, "min_fail_s": 3600,
}


@pytest.mark.usefixtures("prefect_api")
def test_the_flow_writes_a_universe_that_ingest_reads(client: redis.Redis, redis_db_url: str, sim: SimHandle,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.universe import ARTIFACT_KEY, universe_selection

    now = now_ms()
    client.xadd(STREAM_TICKER24H, ticker("BTC-EUR", last="74096", volumeQuote="55800000", bid="74095", ask="74097",
                                         high="75000", low="73000"))
    client.xadd(STREAM_TICKER24H, {**ticker("ETH-EUR", volumeQuote="21100000", bid="2361", ask="2362"),
                                   "last": "NaN"})
    client.xadd(STREAM_BOOK, encode_entry({"ts": now, "recv_ts": now, "market": "BTC-EUR", "nonce": 1,
                                           "bid": Decimal("74095"), "bid_size": Decimal("1"),
                                           "ask": Decimal("74096"), "ask_size": Decimal("1")}))
    for market in ("BTC-EUR", "XRP-EUR"):
        seed_candles(client, market, ZIGZAG, now)
    flow_env(monkeypatch, sim, redis_db_url)

    state = universe_selection(**FLOW_PARAMETERS, return_state=True)
    summary = state.result()
    assert summary["skipped"] is False and summary["universe"] == ["BTC-EUR", "XRP-EUR"]
    assert summary["added"] == ["BTC-EUR", "XRP-EUR"]  # the universe was empty: no qualifying wait
    assert summary["rejects"] == {"status": 1, "ticker:malformed": 1}
    assert summary["gather_tickers_from_stream"] == 1 and summary["gather_tickers_from_rest"] == 2

    stored = {market: json.loads(value) for market, value in client.hgetall(KEY_UNIVERSE).items()}
    assert set(stored) == {"BTC-EUR", "XRP-EUR"}
    btc, xrp = stored["BTC-EUR"], stored["XRP-EUR"]
    assert btc["score"] == "55800000" and btc["since"] >= now and (xrp["rank"], btc["rank"]) == (1, 2)
    assert "spread ok: spread_bps 0.13 <= 20 (book)" in btc["reasons"]
    assert "volatility ok: volatility_bps 109 >= 1 and <= 1000 over 5 1m returns (stream)" in btc["reasons"]
    assert any(r.startswith("ticker ok: rest row") for r in xrp["reasons"])
    assert any(r.startswith("depth ok: thinner side") for r in xrp["reasons"])
    assert set(client.hkeys(KEY_UNIVERSE_STATE)) == {"BTC-EUR", "XRP-EUR"}

    selection = asyncio.run(ingest_selection(redis_db_url))
    assert selection.markets == ("BTC-EUR", "XRP-EUR") and selection.source == KEY_UNIVERSE

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert [a.key for a in artifacts] == [ARTIFACT_KEY]
    assert isinstance(artifacts[0].data, str)  # a table artifact's rows arrive as JSON text
    rows = json.loads(artifacts[0].data)
    decisions = {row["market"]: row["decision"] for row in rows}
    assert decisions == {"BTC-EUR": "add", "XRP-EUR": "add", "ETH-EUR": "reject", "WMTX-EUR": "reject"}
    assert any("status halted" in row["reasons"] for row in rows if row["market"] == "WMTX-EUR")


@pytest.mark.usefixtures("prefect_api")
def test_a_run_that_starts_long_after_its_slot_skips_and_says_so(client: redis.Redis, redis_db_url: str,
                                                                sim: SimHandle,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import Scheduled

    from flows.universe import universe_selection

    client.hset(KEY_UNIVERSE, "ADA-EUR", json.dumps({"score": "1", "reasons": [], "since": 1}))
    flow_env(monkeypatch, sim, redis_db_url)
    parameters = {**FLOW_PARAMETERS, "max_lateness_s": 600}
    with get_client(sync_client=True) as prefect:  # a run scheduled two hours ago, as after a worker outage
        flow_run = prefect.create_flow_run(universe_selection, parameters=parameters,
                                           state=Scheduled(scheduled_time=datetime.now(UTC) - timedelta(hours=2)))
    summary = run_flow(universe_selection, flow_run=flow_run, parameters=parameters)
    assert isinstance(summary, dict) and summary["skipped"] is True
    assert summary["reason"].startswith("stale: 720") and summary["reason"].endswith("> max_lateness_s 600")
    assert client.hkeys(KEY_UNIVERSE) == ["ADA-EUR"] and not client.exists(KEY_UNIVERSE_STATE)
