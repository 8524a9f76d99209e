"""The simulated exchange's state: the matching engine, the generators, and the event pipeline.

Everything runs on one event loop thread, and every engine call is followed synchronously by
`_publish`, so the book the engine holds, the per-market nonce and the events already queued to
subscribers always agree: a snapshot taken at any await point carries the nonce of the newest
published book event (spec §7.4).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

from trading.clock import now_ms, now_ns
from trading.decimals import format_decimal, format_padded
from trading.exchange.intervals import CANDLE_INTERVALS
from trading.matching import FeeRates, Fill, MatchingEngine, MatchResult, Order, Trade
from trading.sim.auth import ApiKey
from trading.sim.backfill import backfill
from trading.sim.candles import CandleSeries
from trading.sim.config import USER_FEES, SimConfig
from trading.sim.faults import Faults
from trading.sim.generator import MARKET_MAKER, ORDER_FLOW, MarketGenerator
from trading.sim.history import TradeHistory, trade_wire
from trading.sim.hub import CANDLES_PREFIX, Hub
from trading.sim.markets import CATALOG, MarketSpec
from trading.sim.ratelimit import RateLimiter
from trading.sim.stats24h import Rolling24h

USER = "user"
_ZERO_FEES = FeeRates(Decimal(0), Decimal(0))
Top = tuple[Decimal, Decimal] | None


@dataclass
class MarketFeed:
    """Per-market publishing state."""

    nonce: int
    published: int = 0  # book events
    trades: int = 0
    ticker: tuple[Top, Top, Decimal | None] = (None, None, None)
    ticker24h: tuple[Any, ...] | None = None


def seeded_ids(seed: int) -> Callable[[], str]:
    rng = random.Random(f"{seed}:ids")
    return lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _dumps(payload: dict[str, Any]) -> str:
    return orjson.dumps(payload).decode()


class SimExchange:
    def __init__(self, config: SimConfig, *, clock_ms: Callable[[], int] = now_ms,
                 clock_ns: Callable[[], int] = now_ns) -> None:
        self.config = config
        self.clock_ms = clock_ms
        self.clock_ns = clock_ns
        self.specs: dict[str, MarketSpec] = {m: CATALOG[m] for m in config.markets}
        self.engine = MatchingEngine([spec.rules() for spec in self.specs.values()], clock=clock_ms,
                                     id_factory=seeded_ids(config.seed), history_limit=config.history_limit)
        self.engine.open_account(USER, dict(config.balances), FeeRates(*USER_FEES))
        self.engine.open_account(MARKET_MAKER, {}, _ZERO_FEES, unlimited=True)
        self.engine.open_account(ORDER_FLOW, {}, _ZERO_FEES, unlimited=True)
        self.api_key = ApiKey(config.api_key, config.api_secret)
        self.key_identity = "key:" + config.api_key[:8]  # the key's rate-limit budget (never the full key)
        self.hub = Hub()
        self.faults = Faults()
        self.limiter = RateLimiter(config.rate_limit, int(config.key_ban_seconds * 1000),
                                   int(config.ip_ban_seconds * 1000), clock_ms)
        self.generators = {m: MarketGenerator(self.engine, spec, config.seed, config.levels)
                           for m, spec in self.specs.items() if spec.status == "trading"}
        started = clock_ms()
        self.feeds: dict[str, MarketFeed] = {}
        self.trades: dict[str, TradeHistory] = {}
        self.candles: dict[str, dict[str, CandleSeries]] = {}
        self.stats: dict[str, Rolling24h] = {}
        for market, spec in self.specs.items():
            rng = random.Random(f"{config.seed}:{market}:history")
            self.feeds[market] = MarketFeed(nonce=rng.randrange(10_000_000, 400_000_000))
            past = backfill(spec, config.seed, started, config.history_minutes)
            self.trades[market] = TradeHistory(config.trade_history)
            for trade in past.trades:
                self.trades[market].append(trade)
            self.candles[market] = {}
            for interval in CANDLE_INTERVALS:
                series = self.candles[market][interval] = CandleSeries(interval)
                series.load(past.candles(interval))
            self.stats[market] = Rolling24h(spec.quantity_decimals, past.minute_rows())
        self.user_volume = Decimal(0)  # EUR traded by the user (GET /account fee volume)
        for market, generator in self.generators.items():
            self._publish(market, generator.open())

    # driving the market
    def step(self, market: str) -> None:
        """One generator step (skipped while the market is not trading)."""
        generator = self.generators.get(market)
        if generator is not None and self.engine.rules(market).status == "trading":
            self._publish(market, generator.step())

    def step_all(self) -> None:
        for market in self.generators:
            self.step(market)

    def apply_user(self, results: list[MatchResult]) -> None:
        """Publish what a user request changed; the market maker learns of its fills."""
        by_market: dict[str, list[MatchResult]] = {}
        for result in results:
            by_market.setdefault(result.order.market, []).append(result)
        for market, group in by_market.items():
            generator = self.generators.get(market)
            if generator is not None:
                for result in group:
                    generator.observe(result)
            self._publish(market, group)

    # queries
    def book_snapshot(self, market: str, depth: int) -> dict[str, Any]:
        bids, asks = self.engine.depth(market, depth)
        return {
            "market": market,
            "nonce": self.feeds[market].nonce,
            "bids": [[format_decimal(p), format_decimal(s)] for p, s in bids],
            "asks": [[format_decimal(p), format_decimal(s)] for p, s in asks],
            "timestamp": self.clock_ns(),
        }

    def ticker24h_row(self, market: str, now: int | None = None) -> dict[str, Any]:
        return self.stats[market].row(market, self.clock_ms() if now is None else now,
                                      self.engine.best_bid(market), self.engine.best_ask(market))

    def last_price(self, market: str) -> Decimal | None:
        return self.stats[market].last_price

    def publish_ticker24h(self) -> None:
        """Once per second: each subscribed market whose 24 h row changed."""
        now = self.clock_ms()
        for market, feed in self.feeds.items():
            if not self.hub.has("ticker24h", market):
                continue
            row = self.ticker24h_row(market, now)
            fingerprint = tuple(v for k, v in row.items() if k not in ("timestamp", "startTimestamp"))
            if fingerprint != feed.ticker24h:
                feed.ticker24h = fingerprint
                self.hub.publish("ticker24h", market, _dumps({"event": "ticker24h", "data": [row]}))

    def ticker_frame(self, market: str) -> dict[str, Any]:
        """The full ticker frame (sent once to a new subscriber)."""
        bid, ask, last = self.feeds[market].ticker
        frame: dict[str, Any] = {"event": "ticker", "market": market}
        _ticker_fields(frame, bid, ask, last)
        return frame

    def forget_ticker24h(self, market: str) -> None:
        """Make the next once-per-second pass send the row (a new subscriber is waiting for it)."""
        self.feeds[market].ticker24h = None

    # the event pipeline
    def _publish(self, market: str, results: list[MatchResult]) -> None:
        if not results:
            return
        levels: dict[tuple[str, Decimal], Decimal] = {}
        user_orders: dict[str, Order] = {}
        user_fills: list[Fill] = []
        trades: list[Trade] = []
        for result in results:
            for change in result.level_changes:
                levels[(change.side, change.price)] = change.size
            trades.extend(result.trades)
            for order in (result.order, *result.touched_orders):
                if order.account_id == USER:
                    user_orders[order.order_id] = order
            user_fills.extend(f for f in (*result.fills, *result.maker_fills) if f.account_id == USER)
        if trades:
            self._publish_trades(market, trades)
        if levels:
            self._publish_book(market, levels)
        self._publish_ticker(market)
        if user_fills or user_orders:
            self._publish_account(market, user_orders, user_fills)

    def _publish_trades(self, market: str, trades: list[Trade]) -> None:
        feed = self.feeds[market]
        history = self.trades[market]
        stats = self.stats[market]
        series = self.candles[market]
        touched: dict[str, int] = {}
        send_trades = self.hub.has("trades", market)
        for trade in trades:
            feed.trades += 1
            history.append(trade)
            stats.add_trade(trade.timestamp, trade.price, trade.amount)
            for interval, candles in series.items():
                touched[interval] = candles.add_trade(trade.timestamp, trade.price, trade.amount)
            if send_trades:
                self.hub.publish("trades", market, _dumps({"event": "trade", "market": market, **trade_wire(trade)}))
        for interval, start in touched.items():
            key = CANDLES_PREFIX + interval
            if self.hub.has(key, market):
                self.hub.publish(key, market, _dumps({"event": "candle", "market": market, "interval": interval,
                                                      "candle": [series[interval].wire(start)]}))

    def _publish_book(self, market: str, levels: dict[tuple[str, Decimal], Decimal]) -> None:
        feed = self.feeds[market]
        feed.nonce += 2 if self.faults.take_nonce_skip(market) else 1
        feed.published += 1
        if not self.hub.has("book", market):
            return
        spec = self.specs[market]
        price_places, size_places = spec.price_decimals, spec.quantity_decimals
        bids: list[list[str]] = []
        asks: list[list[str]] = []
        for (side, price), size in levels.items():
            row = [format_padded(price, price_places), "0" if size == 0 else format_padded(size, size_places)]
            (bids if side == "buy" else asks).append(row)
        self.hub.publish("book", market, _dumps({"event": "book", "market": market, "nonce": feed.nonce,
                                                 "bids": bids, "asks": asks, "timestamp": self.clock_ns()}))

    def _publish_ticker(self, market: str) -> None:
        feed = self.feeds[market]
        bid, ask = self.engine.best_bid(market), self.engine.best_ask(market)
        last = self.stats[market].last_price
        old_bid, old_ask, old_last = feed.ticker
        feed.ticker = (bid, ask, last)
        if not self.hub.has("ticker", market):
            return
        frame: dict[str, Any] = {"event": "ticker", "market": market}
        _ticker_fields(frame, bid if bid != old_bid else None, ask if ask != old_ask else None,
                       last if last != old_last else None)
        if len(frame) > 2:
            self.hub.publish("ticker", market, _dumps(frame))

    def _publish_account(self, market: str, orders: dict[str, Order], fills: list[Fill]) -> None:
        for fill in fills:
            self.user_volume += fill.amount * fill.price
        if not self.hub.has("account", market):
            return
        for fill in fills:
            event: dict[str, Any] = {
                "event": "fill", "timestamp": fill.timestamp, "market": market, "orderId": fill.order_id,
                "fillId": fill.fill_id, "side": fill.side, "amount": format_decimal(fill.amount),
                "price": format_decimal(fill.price), "taker": fill.taker, "fee": format_decimal(fill.fee),
                "feeCurrency": fill.fee_currency,
            }
            order = orders.get(fill.order_id)
            if fill.client_order_id is not None:
                event["clientOrderId"] = fill.client_order_id
            if order is not None and order.operator_id is not None:
                event["operatorId"] = order.operator_id
            self.hub.publish("account", market, _dumps(event))
        for order in orders.values():
            self.hub.publish("account", market, _dumps(order_event(order)))


def order_event(order: Order) -> dict[str, Any]:
    wire = order.to_wire()
    wire.pop("fills", None)
    return {"event": "order", **wire}


def _ticker_fields(frame: dict[str, Any], bid: Top, ask: Top, last: Decimal | None) -> None:
    if bid is not None:
        frame["bestBid"], frame["bestBidSize"] = format_decimal(bid[0]), format_decimal(bid[1])
    if ask is not None:
        frame["bestAsk"], frame["bestAskSize"] = format_decimal(ask[0]), format_decimal(ask[1])
    if last is not None:
        frame["lastPrice"] = format_decimal(last)
