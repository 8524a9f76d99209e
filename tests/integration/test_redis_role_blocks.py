"""A flow connects to Redis as its role's user when make up saved the `redis-<role>` block, as it is otherwise."""

from __future__ import annotations

from prefect_redis import RedisDatabase

from blocks.runtime import with_redis_user
from trading.config import Settings


async def test_a_role_block_puts_its_user_in_the_url_and_no_block_changes_nothing(prefect_api: str) -> None:
    settings = Settings.from_env({"REDIS_URL": "redis://127.0.0.1:6390/2"})
    assert await with_redis_user(settings, "signal-engine") == settings  # no block saved yet
    await RedisDatabase(host="127.0.0.1", port=6390, db=2, username="signal-engine",
                        password="p@ss/w:rd").asave("redis-signal-engine", overwrite=True)
    as_role = await with_redis_user(settings, "signal-engine")
    assert as_role.redis_url == "redis://signal-engine:p%40ss%2Fw%3Ard@127.0.0.1:6390/2"
    assert "p@ss" not in repr(as_role) and "p%40ss" not in repr(as_role)  # the URL never reaches a log line
    assert await with_redis_user(settings, "executor") == settings  # another role: its own block or nothing
