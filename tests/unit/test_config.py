from decimal import Decimal
from pathlib import Path

import pytest

from trading.config import DEFAULT_MARKETS, ConfigError, Settings

KEY = "k" * 64


def test_defaults_are_safe() -> None:
    settings = Settings.from_env({})
    assert settings.dry_run is True
    assert settings.signal_stream == "signals:baseline"
    assert settings.redis_url is None
    assert settings.markets_or_default() == DEFAULT_MARKETS
    assert not settings.has_credentials


def test_values_are_parsed_and_typed() -> None:
    settings = Settings.from_env({
        "REDIS_URL": "redis://127.0.0.1:6379/3", "PARQUET_DIR": "/tmp/lake", "INGEST_MARKETS": "BTC-EUR, ETH-EUR",
        "DRY_RUN": "false", "BITVAVO_OPERATOR_ID": "42", "MAX_NOTIONAL_PER_ORDER_EUR": "12.5",
        "BITVAVO_API_KEY": KEY, "BITVAVO_API_SECRET": "s3cret",
    })
    assert settings.ingest_markets == ("BTC-EUR", "ETH-EUR")
    assert settings.dry_run is False and settings.bitvavo_operator_id == 42
    assert settings.max_notional_per_order == Decimal("12.5")
    assert settings.parquet_dir == Path("/tmp/lake")
    assert settings.has_credentials


@pytest.mark.parametrize(("var", "value", "hint"), [
    ("DRY_RUN", "maybe", "true/false"),
    ("REDIS_URL", "http://x", "redis://"),
    ("INGEST_MARKETS", "btc-eur", "upper case"),
    ("MAX_NOTIONAL_PER_ORDER_EUR", "NaN", "positive decimal"),
    ("MAX_EXPOSURE_TOTAL_EUR", "-5", "positive decimal"),
    ("MAX_OPEN_INTENTS", "0", "positive integer"),
    ("BITVAVO_WS_URL", "https://x", "ws://"),
    ("BITVAVO_ACCESS_WINDOW_MS", "99", "100..60000"),
    ("SIGNAL_STREAM", "bad stream!", "letters"),
])
def test_bad_value_names_the_variable_and_what_is_allowed(var: str, value: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value})
    message = str(info.value)
    assert var in message and hint in message


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"DRY_RUN": "x", "MAX_OPEN_INTENTS": "y"})
    assert len(info.value.problems) == 2


def test_live_mode_requires_operator_id() -> None:
    with pytest.raises(ConfigError, match="BITVAVO_OPERATOR_ID"):
        Settings.from_env({"DRY_RUN": "false"})


def test_credentials_come_in_pairs_and_keys_are_64_chars() -> None:
    with pytest.raises(ConfigError, match="set both or neither"):
        Settings.from_env({"BITVAVO_API_KEY": KEY})
    with pytest.raises(ConfigError, match="64 characters"):
        Settings.from_env({"BITVAVO_API_KEY": "short", "BITVAVO_API_SECRET": "x"})


def test_secrets_never_show() -> None:
    settings = Settings.from_env({"BITVAVO_API_KEY": KEY, "BITVAVO_API_SECRET": "topsecret"})
    assert "topsecret" not in repr(settings) and KEY not in repr(settings)
    assert "topsecret" not in str(settings.describe())
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"BITVAVO_API_KEY": "x" * 10, "BITVAVO_API_SECRET": ""})
    assert "x" * 10 not in str(info.value)


def test_cli_check_config_fails_with_the_variable_named(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from trading.cli import main

    monkeypatch.setenv("DRY_RUN", "perhaps")
    assert main(["check-config"]) == 2
    assert "DRY_RUN" in capsys.readouterr().err
    monkeypatch.setenv("DRY_RUN", "true")
    assert main(["check-config"]) == 0
    assert '"dry_run": "True"' in capsys.readouterr().out


def test_redis_password_is_masked_everywhere() -> None:
    settings = Settings.from_env({"REDIS_URL": "redis://:s3cr3t@redis.internal:6379/0"})
    assert settings.redis_url == "redis://:s3cr3t@redis.internal:6379/0"
    assert "s3cr3t" not in repr(settings) and "s3cr3t" not in str(settings.describe())
    assert settings.describe()["redis_url"] == "redis://:*****@redis.internal:6379/0"
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"REDIS_URL": "http://:s3cr3t@redis.internal"})
    assert "s3cr3t" not in str(info.value)
