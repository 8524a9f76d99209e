import orjson

from trading.bus import KEY_UNIVERSE
from trading.config import DEFAULT_MARKETS, Settings
from trading.ingest.markets import UniverseWatcher, select_markets
from trading.redis_conn import async_client


async def test_ingest_markets_setting_wins_and_pins(redis_db_url: str) -> None:
    client = async_client(redis_db_url)
    try:
        await client.hset(KEY_UNIVERSE, "SOL-EUR", "{}")
        settings = Settings.from_env({"INGEST_MARKETS": "BTC-EUR"})
        selection = await select_markets(settings, client)
        assert selection.markets == ("BTC-EUR",) and selection.source == "INGEST_MARKETS"
        watcher = UniverseWatcher(settings, client, selection)
        await client.hset(KEY_UNIVERSE, "ADA-EUR", "{}")
        assert not await watcher.poll()
    finally:
        await client.aclose()


async def test_universe_then_default_and_changes_are_reported(redis_db_url: str) -> None:
    client = async_client(redis_db_url)
    try:
        settings = Settings.from_env({})
        selection = await select_markets(settings, client)
        assert selection.markets == DEFAULT_MARKETS and selection.source == "default"
        reason = orjson.dumps({"score": "1", "reasons": ["volume"], "since": 1}).decode()
        await client.hset(KEY_UNIVERSE, mapping={"BTC-EUR": reason, "ETH-EUR": reason, "bad name": reason})
        watcher = UniverseWatcher(settings, client, selection)
        change = await watcher.poll()
        assert watcher.current.markets == ("BTC-EUR", "ETH-EUR")
        assert watcher.current.rejected == ("bad name",)
        assert set(change.removed) == set(DEFAULT_MARKETS) - {"BTC-EUR", "ETH-EUR"}
        await client.hdel(KEY_UNIVERSE, "ETH-EUR")
        await client.hset(KEY_UNIVERSE, "XRP-EUR", reason)
        change = await watcher.poll()
        assert (change.added, change.removed) == (("XRP-EUR",), ("ETH-EUR",))
        assert not await watcher.poll()
    finally:
        await client.aclose()
