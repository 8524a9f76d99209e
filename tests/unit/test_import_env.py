"""`.env.bitvavo` → the credentials block: both spellings, clear errors, no secret in a message."""

from __future__ import annotations

import pytest

from blocks.import_env import EnvFileError, credentials_from, parse_env_file

KEY = "k" * 64


def test_block_field_names_and_bitvavo_variables_both_work() -> None:
    values = parse_env_file(f"# trading key\nexport BITVAVO_API_KEY={KEY}\napi_secret='s3cret'\noperator_id=42\n"
                            "rest_url=http://127.0.0.1:8642/v2\n")
    assert values == {"api_key": KEY, "api_secret": "s3cret", "operator_id": "42",
                      "rest_url": "http://127.0.0.1:8642/v2"}
    block = credentials_from(values)
    assert block.api_secret.get_secret_value() == "s3cret" and block.operator_id == 42
    assert "s3cret" not in repr(block)


@pytest.mark.parametrize(("text", "message"), [
    (f"api_key={KEY}\n", "missing api_secret"),
    ("api_key=short\napi_secret=x\n", "64 characters"),
    (f"api_key={KEY}\napi_secret=x\noperator_id=abc\n", "operator_id must be a positive integer"),
    (f"api_key={KEY}\napi_secret=x\nwithdraw_key=1\n", "unknown field 'withdraw_key'"),
    ("just a line\n", "line 1: expected KEY=VALUE"),
])
def test_bad_files_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(EnvFileError, match=message) as caught:
        parse_env_file(text)
    assert KEY not in str(caught.value)
