"""The market generator is deterministic under a seed and keeps a deep, sane book."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from trading.matching import OrderRequest
from trading.sim.config import SimConfig
from trading.sim.exchange import USER, SimExchange
from trading.sim.generator import MARKET_MAKER
from trading.sim.markets import CATALOG

MARKETS = ("BTC-EUR", "XRP-EUR", "PEAQ-EUR")
FIXED_MS = 1_790_000_000_000


class Collector:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def send(self, text: str) -> None:
        self.frames.append(json.loads(text))


def _run(seed: int, steps: int, clock_offset: int = 0) -> tuple[SimExchange, list[dict[str, Any]]]:
    config = SimConfig(seed=seed, markets=MARKETS, balances={"EUR": Decimal(10**7), "BTC": Decimal(100)})
    exchange = SimExchange(config,
                           clock_ms=lambda: FIXED_MS + clock_offset, clock_ns=lambda: FIXED_MS * 10**6)
    collector = Collector()
    for market in MARKETS:
        exchange.hub.subscribe(collector, "book", [market])
        exchange.hub.subscribe(collector, "trades", [market])
    for _ in range(steps):
        exchange.step_all()
    return exchange, collector.frames


def _book_changes(frames: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(f["market"], f["nonce"], f["bids"], f["asks"]) for f in frames if f["event"] == "book"]


def test_same_seed_same_book_changes_regardless_of_time() -> None:
    first, frames_a = _run(seed=11, steps=150)
    second, frames_b = _run(seed=11, steps=150, clock_offset=123_456)
    changes = _book_changes(frames_a)
    assert len(changes) >= 150 * len(MARKETS)  # every step moves every book
    assert changes == _book_changes(frames_b)
    prices = [(f["market"], f["price"], f["amount"], f["side"]) for f in frames_a if f["event"] == "trade"]
    assert prices and prices == [(f["market"], f["price"], f["amount"], f["side"]) for f in frames_b
                                 if f["event"] == "trade"]
    for market in MARKETS:
        assert first.generators[market].regime == second.generators[market].regime
        assert first.engine.depth(market) == second.engine.depth(market)


def test_other_seed_other_book() -> None:
    assert _book_changes(_run(seed=11, steps=20)[1]) != _book_changes(_run(seed=12, steps=20)[1])


def test_book_stays_deep_uncrossed_on_grid_and_nonces_are_contiguous() -> None:
    exchange, frames = _run(seed=3, steps=400)
    for market in MARKETS:
        bids, asks = exchange.engine.depth(market)
        tick = CATALOG[market].tick
        assert len(bids) >= 50 and len(asks) >= 50
        assert bids[0][0] < asks[0][0]
        assert all(price % tick == 0 and size > 0 for price, size in bids + asks)
        start = CATALOG[market].best_bid
        assert abs(bids[0][0] - start) / start < Decimal("0.05")  # drifts, but stays plausible
        nonces = [f["nonce"] for f in frames if f["event"] == "book" and f["market"] == market]
        assert nonces == list(range(nonces[0], nonces[0] + len(nonces)))
        assert nonces[-1] == exchange.feeds[market].nonce
        assert exchange.feeds[market].trades > 0


def test_market_maker_view_tracks_the_engine_through_user_trades() -> None:
    exchange, _ = _run(seed=5, steps=50)
    for side in ("buy", "sell"):
        result = exchange.engine.place(USER, OrderRequest("BTC-EUR", side, "market", amount=Decimal("0.3")))
        exchange.apply_user([result])
        assert result.trades
    for _ in range(20):
        exchange.step_all()
    generator = exchange.generators["BTC-EUR"]
    bids, asks = exchange.engine.depth("BTC-EUR")
    tick = generator.tick
    assert {int(p / tick): int(s.scaleb(8)) for p, s in bids} == {p: v for p, v in generator.bids.items() if v}
    assert {int(p / tick): int(s.scaleb(8)) for p, s in asks} == {p: v for p, v in generator.asks.items() if v}
    assert all(o.account_id == MARKET_MAKER for o in exchange.engine.open_orders(MARKET_MAKER, "BTC-EUR"))
