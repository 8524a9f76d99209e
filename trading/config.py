"""The one runtime settings object, read from the environment.

Every value is parsed and checked at start; all problems are reported together, each naming
the variable, what it got and what is allowed, so a bad deployment fails before it trades.
Secrets (API key/secret) are held as SecretStr, whose repr never shows the value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlsplit, urlunsplit

from pydantic import SecretStr

from trading.decimals import DecimalParseError, parse_decimal

MARKET_PATTERN = re.compile(r"^[A-Z0-9]{1,12}-(EUR|USDC)$")
STREAM_NAME_PATTERN = re.compile(r"^[A-Za-z0-9:_\-.]{1,128}$")
DEFAULT_REST_URL = "https://api.bitvavo.com/v2"
DEFAULT_WS_URL = "wss://ws.bitvavo.com/v2/"
DEFAULT_SIGNAL_STREAM = "signals:baseline"
DEFAULT_MARKETS = ("BTC-EUR", "ETH-EUR", "XRP-EUR", "SOL-EUR", "ADA-EUR")



class ConfigError(ValueError):
    """One or more settings are invalid; the message lists each with the fix."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("allowed: true/false (also 1/0, yes/no, on/off)")


def _positive_int(raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError("allowed: a positive integer") from None
    if value <= 0:
        raise ValueError("allowed: a positive integer")
    return value


def _port(raw: str) -> int:
    value = _positive_int(raw)
    if value > 65535:
        raise ValueError("allowed: a TCP port 1..65535")
    return value


def _positive_decimal(raw: str) -> Decimal:
    try:
        value = parse_decimal(raw.strip())
    except DecimalParseError:
        raise ValueError("allowed: a positive decimal number such as 250 or 12.5") from None
    if value <= 0:
        raise ValueError("allowed: a positive decimal number such as 250 or 12.5")
    return value


def _non_negative_int(raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError("allowed: an integer >= 0") from None
    if value < 0:
        raise ValueError("allowed: an integer >= 0")
    return value


def _window_size(raw: str) -> int:
    value = _positive_int(raw)
    if value < 2:
        raise ValueError("allowed: an integer >= 2 (a volatility needs two samples)")
    return value


def _non_negative_decimal(raw: str) -> Decimal:
    try:
        value = parse_decimal(raw.strip())
    except DecimalParseError:
        raise ValueError("allowed: a decimal number >= 0 such as 0 or 2.5") from None
    if value < 0:
        raise ValueError("allowed: a decimal number >= 0 such as 0 or 2.5")
    return value


def _markets(raw: str) -> tuple[str, ...]:
    markets = tuple(m.strip() for m in raw.split(",") if m.strip())
    if not markets:
        raise ValueError("allowed: a comma-separated list of markets such as BTC-EUR,ETH-EUR")
    bad = [m for m in markets if not MARKET_PATTERN.match(m)]
    if bad:
        raise ValueError(f"invalid market(s) {', '.join(bad)}; allowed: BASE-EUR or BASE-USDC in upper case")
    return markets


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        parsed = urlparse(raw.strip())
        if parsed.scheme not in schemes or not (parsed.netloc or parsed.path):
            raise ValueError(f"allowed: a URL starting with {' or '.join(s + '://' for s in schemes)}")
        return raw.strip()
    return parse


def _stream_name(raw: str) -> str:
    if not STREAM_NAME_PATTERN.match(raw):
        raise ValueError("allowed: letters, digits and : _ - . (max 128 chars)")
    return raw


def _path(raw: str) -> Path:
    if not raw.strip():
        raise ValueError("allowed: a directory path")
    return Path(raw.strip()).expanduser()


def _secret(raw: str) -> SecretStr:
    if not raw.strip():
        raise ValueError("allowed: a non-empty value (or leave the variable unset)")
    return SecretStr(raw.strip())


def mask_url_password(url: str) -> str:
    """redis://user:secret@host/0 -> redis://user:*****@host/0 (logs, artifacts, errors)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":*****@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = field(default=None, repr=False)  # may embed a password
    parquet_dir: Path = Path("var/lake")
    ingest_markets: tuple[str, ...] | None = None
    dry_run: bool = True
    signal_stream: str = DEFAULT_SIGNAL_STREAM
    stream_maxlen: int = 100_000
    # Risk limits (EUR); the trading core refuses intents beyond them.
    max_notional_per_order: Decimal = Decimal("250")
    max_exposure_per_market: Decimal = Decimal("1000")
    max_exposure_total: Decimal = Decimal("5000")
    max_open_intents: int = 20
    max_daily_loss: Decimal = Decimal("250")
    # Trading pipeline: the baseline strategy's thresholds, order sizing and guards.
    signal_max_spread_bps: Decimal = Decimal("25")  # a signal needs a spread at most this wide
    signal_min_volatility_bps: Decimal = Decimal("2")  # ... and rolling volatility at least this
    signal_window: int = 30  # book samples in the rolling spread/volatility window
    order_notional: Decimal = Decimal("50")  # EUR per intent before the guards
    stale_book_ms: int = 5_000  # a book older than this blocks intents for its market
    market_cooldown_ms: int = 30_000  # minimum time between two intents for one market
    # Exchange.
    bitvavo_rest_url: str = DEFAULT_REST_URL
    bitvavo_ws_url: str = DEFAULT_WS_URL
    bitvavo_operator_id: int | None = None
    bitvavo_api_key: SecretStr | None = None
    bitvavo_api_secret: SecretStr | None = None
    bitvavo_access_window_ms: int = 10_000
    metrics_host: str = "127.0.0.1"

    @property
    def has_credentials(self) -> bool:
        return self.bitvavo_api_key is not None and self.bitvavo_api_secret is not None

    def markets_or_default(self) -> tuple[str, ...]:
        return self.ingest_markets or DEFAULT_MARKETS

    def describe(self) -> dict[str, str]:
        """Settings for logs and artifacts: secrets masked."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, SecretStr):
                out[f.name] = "**********"
            elif f.name == "redis_url" and value is not None:
                out[f.name] = mask_url_password(value)
            else:
                out[f.name] = str(value)
        return out

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        source = os.environ if env is None else env
        problems: list[str] = []
        values: dict[str, Any] = {}

        def read(var: str, attr: str, parse: Callable[[str], Any]) -> None:
            raw = source.get(var)
            if raw is None or raw == "":
                return
            try:
                values[attr] = parse(raw)
            except ValueError as exc:
                problems.append(f"{var}={_shown(var, raw)!r}: {exc}")

        read("REDIS_URL", "redis_url", _url(("redis", "rediss", "unix")))
        read("PARQUET_DIR", "parquet_dir", _path)
        read("INGEST_MARKETS", "ingest_markets", _markets)
        read("DRY_RUN", "dry_run", _bool)
        read("SIGNAL_STREAM", "signal_stream", _stream_name)
        read("STREAM_MAXLEN", "stream_maxlen", _positive_int)
        read("MAX_NOTIONAL_PER_ORDER_EUR", "max_notional_per_order", _positive_decimal)
        read("MAX_EXPOSURE_PER_MARKET_EUR", "max_exposure_per_market", _positive_decimal)
        read("MAX_EXPOSURE_TOTAL_EUR", "max_exposure_total", _positive_decimal)
        read("MAX_OPEN_INTENTS", "max_open_intents", _positive_int)
        read("MAX_DAILY_LOSS_EUR", "max_daily_loss", _positive_decimal)
        read("SIGNAL_MAX_SPREAD_BPS", "signal_max_spread_bps", _positive_decimal)
        read("SIGNAL_MIN_VOLATILITY_BPS", "signal_min_volatility_bps", _non_negative_decimal)
        read("SIGNAL_WINDOW", "signal_window", _window_size)
        read("ORDER_NOTIONAL_EUR", "order_notional", _positive_decimal)
        read("STALE_BOOK_MS", "stale_book_ms", _positive_int)
        read("MARKET_COOLDOWN_MS", "market_cooldown_ms", _non_negative_int)
        read("BITVAVO_REST_URL", "bitvavo_rest_url", _url(("http", "https")))
        read("BITVAVO_WS_URL", "bitvavo_ws_url", _url(("ws", "wss")))
        read("BITVAVO_OPERATOR_ID", "bitvavo_operator_id", _positive_int)
        read("BITVAVO_API_KEY", "bitvavo_api_key", _secret)
        read("BITVAVO_API_SECRET", "bitvavo_api_secret", _secret)
        read("BITVAVO_ACCESS_WINDOW_MS", "bitvavo_access_window_ms", _window)
        read("METRICS_HOST", "metrics_host", _host)

        key, secret = values.get("bitvavo_api_key"), values.get("bitvavo_api_secret")
        if (key is None) != (secret is None):
            problems.append("BITVAVO_API_KEY and BITVAVO_API_SECRET: set both or neither")
        if key is not None and len(key.get_secret_value()) != 64:
            problems.append("BITVAVO_API_KEY: must be 64 characters (Bitvavo API keys are)")
        if values.get("dry_run") is False and values.get("bitvavo_operator_id") is None:
            problems.append("BITVAVO_OPERATOR_ID: required when DRY_RUN=false (mandatory on Bitvavo orders)")
        if problems:
            raise ConfigError(problems)
        return cls(**values)


def _window(raw: str) -> int:
    value = _positive_int(raw)
    if not 100 <= value <= 60_000:
        raise ValueError("allowed: 100..60000 (ms)")
    return value


def _host(raw: str) -> str:
    if not raw.strip() or " " in raw.strip():
        raise ValueError("allowed: a host name or IP address such as 127.0.0.1")
    return raw.strip()


def _shown(var: str, raw: str) -> str:
    if var in ("BITVAVO_API_KEY", "BITVAVO_API_SECRET"):
        return "**********"
    return mask_url_password(raw) if var == "REDIS_URL" else raw
