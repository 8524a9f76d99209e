"""The settings a flow runs with: the environment, with the credentials block over it when saved.

Production keeps the key pair in the `bitvavo-credentials/default` block; `BITVAVO_*` variables
(or `.env.bitvavo` imported into the block) are the fallback. A block that exists but cannot be
read (wrong encryption key) fails the run: trading on half a configuration is worse than not.

Redis: a flow names its role (`redis_role`, trading/redis_acl.py); when the `redis-<role>` block
exists (make up saves one per role), its user and password replace the URL's, so the flow can
touch only its own keys. Without the block, `REDIS_URL` (or the embedded default) as it is.
Synchronous flows (universe selection, backup) use `with_redis_user_sync`.
"""

from __future__ import annotations

import dataclasses
from typing import cast
from urllib.parse import quote, urlsplit, urlunsplit

from prefect.exceptions import ObjectNotFound
from prefect_redis import RedisDatabase  # type: ignore[import-untyped]  # ships no type hints

from blocks.credentials import DEFAULT_BLOCK_NAME, BitvavoCredentials
from trading.config import ConfigError, Settings


async def load_settings(block_name: str = DEFAULT_BLOCK_NAME, *, redis_role: str | None = None) -> Settings:
    settings = Settings.from_env()
    if redis_role is not None:
        settings = await with_redis_user(settings, redis_role)
    try:
        block = cast(BitvavoCredentials, await BitvavoCredentials.aload(block_name))
    except ValueError as exc:  # prefect raises ValueError(...) from ObjectNotFound for a missing document
        if isinstance(exc.__cause__, ObjectNotFound):
            return settings
        raise
    merged = dataclasses.replace(settings, bitvavo_api_key=block.api_key, bitvavo_api_secret=block.api_secret,
                                 bitvavo_operator_id=block.operator_id or settings.bitvavo_operator_id,
                                 bitvavo_rest_url=block.rest_url, bitvavo_ws_url=block.ws_url)
    if not merged.dry_run and merged.bitvavo_operator_id is None:
        raise ConfigError([f"block bitvavo-credentials/{block_name}: operator_id is required when DRY_RUN=false"])
    return merged


async def with_redis_user(settings: Settings, role: str) -> Settings:
    """`settings` with the `redis-<role>` block's user on the same server, or unchanged without the block."""
    try:
        block = cast(RedisDatabase, await RedisDatabase.aload(f"redis-{role}"))
    except ValueError as exc:
        if isinstance(exc.__cause__, ObjectNotFound):
            return settings
        raise
    return _as_user(settings, block)


def with_redis_user_sync(settings: Settings, role: str) -> Settings:
    """`with_redis_user` for a synchronous flow."""
    try:
        block = cast(RedisDatabase, RedisDatabase.load(f"redis-{role}"))
    except ValueError as exc:
        if isinstance(exc.__cause__, ObjectNotFound):
            return settings
        raise
    return _as_user(settings, block)


def _as_user(settings: Settings, block: RedisDatabase) -> Settings:
    if not settings.redis_url or block.username is None or block.password is None:
        return settings  # the embedded default has no users, and a block without them changes nothing
    parts = urlsplit(settings.redis_url)
    user, password = block.username.get_secret_value(), block.password.get_secret_value()  # both SecretStr
    credentials = f"{quote(user, safe='')}:{quote(password, safe='')}@"
    netloc = credentials + parts.netloc.rpartition("@")[2]
    return dataclasses.replace(settings, redis_url=urlunsplit(parts._replace(netloc=netloc)))
