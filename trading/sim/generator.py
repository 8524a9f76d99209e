"""Deterministic market generator: a market maker quoting a deep book around a drifting price, and
aggressive order flow that trades through the matching engine and moves the book.

Determinism: each market draws from its own `random.Random(f"{seed}:{market}")`, and a step
depends only on that stream and the engine state the generator itself produced, so the sequence
of book changes is a function of (seed, step count) and never of wall-clock timing. Orders from
the user account perturb it, as they would on a real exchange.

Prices are integer ticks and sizes integer lots (10^-quantityDecimals) inside the model; the
engine only ever sees exact Decimals built from them. The random model itself uses floats.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from decimal import Decimal
from itertools import chain

from trading.exchange.errors import BitvavoError
from trading.matching import MatchingEngine, MatchResult, OrderRequest, Side
from trading.sim.markets import MarketSpec

MARKET_MAKER = "sim-market-maker"
ORDER_FLOW = "sim-order-flow"
MIN_FLOW_NOTIONAL = 12.0  # EUR; above the 5 EUR minimum at any plausible drift
_MEAN_REVERSION = 0.0002  # per step, towards the starting price: keeps long runs near real levels
_EXTRA_LEVELS = 10  # slack above the target depth before the far end is trimmed


@dataclass(frozen=True)
class Regime:
    name: str
    sigma: float  # relative price move per step (Gaussian σ)
    trade_probability: float  # chance of an aggressive order per step
    trade_scale: float  # multiplies the typical trade size
    leave_probability: float  # chance per step of switching to the other regime


CALM = Regime("calm", 0.00003, 0.10, 1.0, 0.002)
VOLATILE = Regime("volatile", 0.00020, 0.35, 3.0, 0.02)


class MarketGenerator:
    def __init__(self, engine: MatchingEngine, spec: MarketSpec, seed: int, levels: int) -> None:
        self.engine = engine
        self.market = spec.market
        self.rng = random.Random(f"{seed}:{spec.market}")
        self.tick = spec.tick
        self._tick_f = float(spec.tick)
        self.quantity_decimals = spec.quantity_decimals
        self._lot_f = 10.0 ** -spec.quantity_decimals
        self.levels = levels
        self.anchor = int(spec.best_bid / spec.tick)
        self.best_bid = self.anchor
        self.base_spread = spec.spread_ticks
        self.spread = spec.spread_ticks
        self.avg_gap = max(1, round(float(spec.book_span) * self.anchor / levels))
        self.level_notional = float(spec.volume_quote_24h) / 5000
        self.trade_notional = max(MIN_FLOW_NOTIONAL, float(spec.volume_quote_24h) / 86400)
        self.min_flow_lots = int(spec.min_order_base.scaleb(spec.quantity_decimals))
        self.regime = CALM
        self.steps = 0
        # The market maker's resting size per price (ticks -> lots), kept equal to the engine's.
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}

    # public
    def open(self) -> list[MatchResult]:
        """Quote the initial book."""
        return self._requote()

    def step(self) -> list[MatchResult]:
        self.steps += 1
        rng = self.rng
        if rng.random() < self.regime.leave_probability:
            self.regime = VOLATILE if self.regime is CALM else CALM
        drift = rng.gauss(0.0, self.regime.sigma * self.best_bid)
        drift += (self.anchor - self.best_bid) * _MEAN_REVERSION
        move = round(drift)
        self.best_bid = max(self.base_spread + 1, self.best_bid + move)
        self.spread = self.base_spread + (rng.randint(1, 2 * self.base_spread) if rng.random() < 0.1 else 0)
        results: list[MatchResult] = []
        if rng.random() < self.regime.trade_probability:
            results.extend(self._take(move))
        results.extend(self._requote())
        return results

    def observe(self, result: MatchResult) -> None:
        """Account for the market maker's fills (its levels were hit, or its quote crossed)."""
        for fill in chain(result.fills, result.maker_fills):
            if fill.account_id != MARKET_MAKER:
                continue
            book = self.bids if fill.side == "buy" else self.asks
            price = int(fill.price / self.tick)
            if price in book:
                book[price] = max(0, book[price] - int(fill.amount.scaleb(self.quantity_decimals)))

    # flow
    def _take(self, move: int) -> list[MatchResult]:
        rng = self.rng
        side: Side = "buy" if rng.random() < 0.5 + 0.1 * ((move > 0) - (move < 0)) else "sell"
        notional = self.trade_notional * rng.lognormvariate(0.0, 1.0) * self.regime.trade_scale
        lots = max(self.min_flow_lots, int(max(MIN_FLOW_NOTIONAL, notional) / self._price_f(self.best_bid)
                                           / self._lot_f))
        request = OrderRequest(self.market, side, "market", amount=Decimal(lots).scaleb(-self.quantity_decimals))
        try:
            result = self.engine.place(ORDER_FLOW, request)
        except BitvavoError:
            return []  # e.g. an empty side: the flow simply does not trade this step
        self.observe(result)
        if result.trades:
            last = int(result.trades[-1].price / self.tick)
            # The book has moved to where the aggressor stopped.
            if side == "buy":
                self.best_bid = max(self.best_bid, last - self.spread)
            else:
                self.best_bid = min(self.best_bid, last)
        return [result]

    # market maker
    def _requote(self) -> list[MatchResult]:
        top_bid = self.best_bid
        top_ask = top_bid + self.spread
        changes: dict[tuple[Side, int], int] = {}
        for price in [p for p in self.bids if p > top_bid]:
            changes[("buy", price)] = 0
            del self.bids[price]
        for price in [p for p in self.asks if p < top_ask]:
            changes[("sell", price)] = 0
            del self.asks[price]
        self._fill_side("buy", self.bids, top_bid, -1, changes)
        self._fill_side("sell", self.asks, top_ask, 1, changes)
        self._perturb(changes)
        # Removals first, so a moved quote never meets the market maker's own stale level.
        ordered = sorted(changes.items(), key=lambda item: item[1] != 0)
        results: list[MatchResult] = []
        for (side, price), lots in ordered:
            result = self.engine.set_liquidity_level(
                MARKET_MAKER, self.market, side, Decimal(price) * self.tick,
                Decimal(lots).scaleb(-self.quantity_decimals))
            if result is not None:
                self.observe(result)
                results.append(result)
        return results

    def _fill_side(self, side: Side, book: dict[int, int], top: int, away: int,
                   changes: dict[tuple[Side, int], int]) -> None:
        """Keep a level at the top, fill a gap the price move opened, keep the depth in range."""
        for price in [p for p, lots in book.items() if lots == 0 and p != top]:
            del book[price]  # consumed by trades; the engine no longer has it
        if book.get(top, 0) == 0:
            self._set(side, book, top, self._new_lots(top), changes)
        beyond = [p for p in book if (p - top) * away > 0]
        nearest = (max(beyond) if away < 0 else min(beyond)) if beyond else None
        cursor = top
        while True:
            candidate = cursor + away * self._gap()
            if candidate <= 0:
                break
            if nearest is not None and (candidate - nearest) * away >= 0:
                break
            if nearest is None and len(book) >= self.levels:
                break
            self._set(side, book, candidate, self._new_lots(candidate), changes)
            cursor = candidate
        while len(book) < self.levels:
            far = min(book) if away < 0 else max(book)
            candidate = far + away * self._gap()
            if candidate <= 0:
                break
            self._set(side, book, candidate, self._new_lots(candidate), changes)
        while len(book) > self.levels + _EXTRA_LEVELS:
            far = min(book) if away < 0 else max(book)
            del book[far]
            changes[(side, far)] = 0

    def _perturb(self, changes: dict[tuple[Side, int], int]) -> None:
        """Re-size (sometimes pull) a few levels near the top, as other quoters would."""
        rng = self.rng
        for _ in range(rng.randint(1, 3)):
            side: Side = "buy" if rng.random() < 0.5 else "sell"
            book = self.bids if side == "buy" else self.asks
            ranked = sorted(book, reverse=side == "buy")
            if not ranked:
                continue
            index = min(len(ranked) - 1, int(rng.expovariate(1 / 6)))
            price = ranked[index]
            if index > 0 and rng.random() < 0.1:
                del book[price]
                changes[(side, price)] = 0
            else:
                lots = max(1, int(book[price] * rng.lognormvariate(0.0, 0.4)))
                self._set(side, book, price, lots, changes)

    def _set(self, side: Side, book: dict[int, int], price: int, lots: int,
             changes: dict[tuple[Side, int], int]) -> None:
        book[price] = lots
        changes[(side, price)] = lots

    def _gap(self) -> int:
        return self.rng.randint(1, 2 * self.avg_gap - 1)

    def _new_lots(self, price: int) -> int:
        notional = self.level_notional * self.rng.lognormvariate(0.0, 0.9)
        return max(1, int(notional / self._price_f(price) / self._lot_f))

    def _price_f(self, price: int) -> float:
        return price * self._tick_f
