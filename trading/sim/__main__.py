"""`python -m trading.sim --port PORT [...]`: serve the simulator until SIGTERM/SIGINT.

Prints `REST_URL=http://127.0.0.1:PORT/v2` and `WS_URL=ws://127.0.0.1:PORT/v2/` (then
`CONTROL_URL=...`), one line each, flushed, once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from decimal import Decimal

from aiohttp import web

from trading.decimals import DecimalParseError, parse_decimal
from trading.sim.app import build_app
from trading.sim.auth import KEY_LENGTH
from trading.sim.backfill import HISTORY_MINUTES
from trading.sim.config import DEFAULT_API_KEY, DEFAULT_API_SECRET, DEFAULT_BALANCES, SimConfig
from trading.sim.exchange import SimExchange
from trading.sim.markets import CATALOG, DEFAULT_MARKETS

HOST = "127.0.0.1"  # loopback only: the simulator has no real security


def _markets(raw: str) -> tuple[str, ...]:
    markets = tuple(m.strip() for m in raw.split(",") if m.strip())
    unknown = [m for m in markets if m not in CATALOG]
    if unknown or not markets:
        raise argparse.ArgumentTypeError(f"unknown markets {unknown}; known: {', '.join(CATALOG)}")
    return markets


def _balances(raw: str) -> dict[str, Decimal]:
    balances: dict[str, Decimal] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        symbol, _, amount = item.partition("=")
        try:
            value = parse_decimal(amount, symbol)
        except DecimalParseError as error:
            raise argparse.ArgumentTypeError(f"balance {item!r}: {error}") from None
        if not symbol.isalnum() or value < 0:
            raise argparse.ArgumentTypeError(f"balance {item!r}: expected SYMBOL=non-negative amount")
        balances[symbol.upper()] = value
    return balances


def _api_key(raw: str) -> str:
    if len(raw) != KEY_LENGTH:
        raise argparse.ArgumentTypeError(f"the API key must have {KEY_LENGTH} characters")
    return raw


def parse_args(argv: Sequence[str] | None = None) -> tuple[SimConfig, str]:
    """The settings, and the log level name."""
    defaults = SimConfig()
    parser = argparse.ArgumentParser(prog="python -m trading.sim", description="Local Bitvavo exchange simulator")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: pick a free one)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="generator seed (default %(default)s)")
    parser.add_argument("--markets", type=_markets, default=DEFAULT_MARKETS,
                        help="comma-separated markets (default: the 14 trading markets; WMTX-EUR is halted)")
    parser.add_argument("--api-key", type=_api_key, default=DEFAULT_API_KEY, help="the one account's key (64 chars)")
    parser.add_argument("--api-secret", default=DEFAULT_API_SECRET, help="its secret")
    parser.add_argument("--balance", type=_balances, default=DEFAULT_BALANCES,
                        help="starting balances, e.g. EUR=10000,BTC=0.5 (default EUR=10000,BTC=0.5,ETH=5)")
    parser.add_argument("--rate-limit", type=int, default=defaults.rate_limit, help="weight per minute (1000)")
    parser.add_argument("--ban-seconds", type=float, default=None,
                        help="ban length for both keys and IPs (default: 60 s per key, 900 s per IP)")
    parser.add_argument("--book-rate", type=float, default=defaults.book_rate,
                        help="book updates per second per market (default %(default)s)")
    parser.add_argument("--levels", type=int, default=defaults.levels, help="market-maker levels per side")
    parser.add_argument("--history-limit", type=int, default=defaults.history_limit,
                        help="closed orders and fills kept per account and market")
    parser.add_argument("--history-minutes", type=int, default=defaults.history_minutes,
                        help="minutes of generated past per market before the start, 0..1440 (0: none)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    if args.book_rate <= 0 or args.rate_limit <= 0 or args.levels < 1 or args.history_limit < 1:
        parser.error("--book-rate, --rate-limit, --levels and --history-limit must be positive")
    if not 0 <= args.history_minutes <= HISTORY_MINUTES:
        parser.error(f"--history-minutes must be within 0..{HISTORY_MINUTES}")
    return SimConfig(
        host=HOST, port=args.port, seed=args.seed, markets=args.markets, api_key=args.api_key,
        api_secret=args.api_secret, balances=dict(args.balance), rate_limit=args.rate_limit,
        key_ban_seconds=args.ban_seconds if args.ban_seconds is not None else defaults.key_ban_seconds,
        ip_ban_seconds=args.ban_seconds if args.ban_seconds is not None else defaults.ip_ban_seconds,
        book_rate=args.book_rate, levels=args.levels, history_limit=args.history_limit,
        history_minutes=args.history_minutes), args.log_level.upper()


async def serve(config: SimConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    exchange = SimExchange(config)
    runner = web.AppRunner(build_app(exchange, config.book_rate), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, shutdown_timeout=2.0)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"REST_URL=http://{host}:{port}/v2", flush=True)
    print(f"WS_URL=ws://{host}:{port}/v2/", flush=True)
    print(f"CONTROL_URL=http://{host}:{port}/_sim", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    config, log_level = parse_args(argv)
    logging.basicConfig(level=log_level, stream=sys.stderr)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
