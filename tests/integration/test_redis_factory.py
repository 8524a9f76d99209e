import os

import pytest
import redis

from trading.config import Settings
from trading.redis_conn import EmbeddedRedis, async_client, redis_url, sync_client


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_embedded_server_starts_serves_and_stops_by_pid() -> None:
    with redis_url(Settings.from_env({})) as url:
        client = sync_client(url)
        client.xadd("s", {"v": "1"})
        assert client.xlen("s") == 1
        client.close()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=port, socket_connect_timeout=0.5).ping()


def test_embedded_server_stop_is_idempotent_and_kills_the_process() -> None:
    server = EmbeddedRedis()
    server.start()
    pid = server.pid
    assert pid is not None and _alive(pid)
    server.stop()
    server.stop()
    assert not _alive(pid)


def test_redis_url_setting_is_used_as_is(redis_db_url: str) -> None:
    settings = Settings.from_env({"REDIS_URL": redis_db_url})
    with redis_url(settings) as url:
        assert url == redis_db_url


async def test_async_client_talks_to_the_same_server(redis_db_url: str) -> None:
    client = async_client(redis_db_url)
    try:
        await client.set("k", "v")
        assert await client.get("k") == "v"
    finally:
        await client.aclose()
