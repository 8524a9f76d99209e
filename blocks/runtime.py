"""The settings a flow runs with: the environment, with the credentials block over it when saved.

Production keeps the key pair in the `bitvavo-credentials/default` block; `BITVAVO_*` variables
(or `.env.bitvavo` imported into the block) are the fallback. A block that exists but cannot be
read (wrong encryption key) fails the run: trading on half a configuration is worse than not.
"""

from __future__ import annotations

import dataclasses
from typing import cast

from prefect.exceptions import ObjectNotFound

from blocks.credentials import DEFAULT_BLOCK_NAME, BitvavoCredentials
from trading.config import ConfigError, Settings


async def load_settings(block_name: str = DEFAULT_BLOCK_NAME) -> Settings:
    settings = Settings.from_env()
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
