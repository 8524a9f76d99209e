"""Simulator settings (one frozen object built from the CLI) and their documented defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from trading.exchange.weights import RATE_LIMIT_PER_MINUTE
from trading.sim.markets import DEFAULT_MARKETS

# Obviously fake credentials; the key has the 64 characters Bitvavo requires.
DEFAULT_API_KEY = "sim0" * 16
DEFAULT_API_SECRET = "simulator-secret-not-for-production"
DEFAULT_BALANCES = {"EUR": Decimal("10000"), "BTC": Decimal("0.5"), "ETH": Decimal("5")}
USER_FEES = (Decimal("0.0015"), Decimal("0.0025"))  # maker, taker: category A first tier


@dataclass(frozen=True)
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 0
    seed: int = 1
    markets: tuple[str, ...] = DEFAULT_MARKETS
    api_key: str = DEFAULT_API_KEY
    api_secret: str = DEFAULT_API_SECRET
    balances: dict[str, Decimal] = field(default_factory=lambda: dict(DEFAULT_BALANCES))
    rate_limit: int = RATE_LIMIT_PER_MINUTE  # weight per minute per key / per IP
    key_ban_seconds: float = 60.0
    ip_ban_seconds: float = 900.0
    book_rate: float = 10.0  # generator steps (book updates) per second per market
    levels: int = 60  # market-maker levels per side
    history_limit: int = 1000  # closed orders and fills kept per account and market
    trade_history: int = 5000  # public trades kept per market
    history_minutes: int = 1440  # generated past per market before the start (backfill.py); 0: none
