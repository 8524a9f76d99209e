"""`BitvavoCredentials`: the exchange API key pair, kept encrypted in the Prefect database.

Field names match `.env.bitvavo` (and the `BITVAVO_*` variables without the prefix), so
`python -m blocks.import_env` can move a file into the block. The secret fields are SecretStr:
the UI, the API and `repr` show `**********`. `PREFECT_SERVER_ENCRYPTION_KEY` (generated once by
`make up`, kept outside the database) encrypts them, so a database backup holds no usable key.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

DEFAULT_BLOCK_NAME = "default"


class BitvavoCredentials(Block):
    _block_type_name = "Bitvavo Credentials"
    _block_type_slug = "bitvavo-credentials"
    _description = "Bitvavo API key pair (trade-only; never with withdrawal rights), operator id and endpoints."

    api_key: SecretStr = Field(description="64-character Bitvavo API key")
    api_secret: SecretStr = Field(description="Bitvavo API secret")
    operator_id: int | None = Field(default=None, description="operatorId sent with every order (mandatory live)")
    rest_url: str = Field(default="https://api.bitvavo.com/v2")
    ws_url: str = Field(default="wss://ws.bitvavo.com/v2/")
