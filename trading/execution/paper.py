"""The paper venue (dry-run): intents become orders in a local mirror of the live Bitvavo book.

The mirror is a `MatchingEngine` (the one engine) holding two accounts:
- `market`, unlimited: its resting size at every price equals the exchange book's, kept so by
  `set_liquidity_level` for exactly the levels each applied book update changed;
- `paper`: our balances (default EUR 10000) and fee rates (default Bitvavo category A, first
  tier: maker 0.15 %, taker 0.25 %).
An intent is placed as a real order of the paper account: it walks the mirrored book, fills in
part, rests (GTC) and pays fees with Bitvavo's rounding, all done by the engine. A resting paper
order fills when a later book update crosses it (the mirrored level trades against it, the paper
order being the maker); those fills come out of `poll()`. Liquidity a paper order took stays
taken until the exchange next updates that level: the exchange never saw the paper order.

The book comes from `LiveBooks` over a `BitvavoWebSocket` (public `book` channel). While a
market's book is not live (gap, resync, dropped socket) the mirror is not updated, so resting
orders cannot fill against a frozen book, and new orders are refused ("book not in sync"); the
snapshot that heals it reloads the mirror in full. A market first seen in an intent is
subscribed then, and the intent waits up to `book_wait_s` for its book ("no live book" after).

Paper orders live in this process only. The executor keeps the last report of every open paper
order in `KEY_PAPER_OPEN`; after a restart `restart_cancellations` turns each into a final
`canceled` report, so the open-intent count and the PnL stay right.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

from trading.book import BookSync
from trading.clock import now_ms
from trading.config import Settings
from trading.decimals import ZERO
from trading.exchange.errors import BitvavoError
from trading.exchange.governor import budget_identity, shared_governor
from trading.exchange.live_book import LiveBooks
from trading.exchange.market_rules import rules_from_markets
from trading.exchange.models import BookSnapshot, Level, parse_price
from trading.exchange.rest import BitvavoRest
from trading.exchange.ws import BitvavoWebSocket
from trading.execution.market_rules_book import MarketRulesBook
from trading.log_sampling import worth_logging
from trading.matching import FeeRates, MarketRules, MatchingEngine, Order, OrderRequest, Side
from trading.orders import FINAL_STATUSES, ExecutionReport, FillRecord, Intent, IntentError

log = logging.getLogger(__name__)

PAPER_ACCOUNT = "paper"
MARKET_ACCOUNT = "market"
# Bitvavo category A (EUR crypto markets), first volume tier (shared/bitvavo-api.md §5.6).
DEFAULT_FEES = FeeRates(maker=Decimal("0.0015"), taker=Decimal("0.0025"))
DEFAULT_BALANCES: Mapping[str, Decimal] = {"EUR": Decimal("10000")}
KEY_PAPER_OPEN = "executor:paper:open"  # hash intent_id -> JSON of the last report of an open paper order
RESTART_REASON = "paper order lost on executor restart"
NOT_IN_SYNC = "book not in sync"
NO_LIVE_BOOK = "no live book"
_FILL_NAMESPACE = uuid.UUID("0b8f5c2e-7d1a-4e8b-9c3f-5a6d2e1f4b70")
_ENGINE_HISTORY = 1000  # closed orders kept per account and market (the mirror churns level orders)
_FRAME_SIDES: tuple[tuple[str, Side], ...] = (("bids", "buy"), ("asks", "sell"))
_RESNAPSHOT_S = 0.5
CLOSE_WAIT_S = 5.0  # how often books that are not live are asked for again
_LIVE_STATUSES = frozenset({"new", "partiallyFilled", "awaitingTrigger", "filled", "canceled"})


def paper_fill_id(order_id: str, index: int) -> str:
    """The n-th fill of one paper order. Reporting the order again gives the same ids (readers dedupe);
    executing its intent again after a crash places a new order (a new uuid4 order id), whose fills,
    at other prices maybe, get new ids: a fill id never names two different fills."""
    return str(uuid.uuid5(_FILL_NAMESPACE, f"{order_id}:{index}"))


def contract_status(engine_status: str) -> tuple[str, str | None]:
    """The engine's order status as an `orders:executed` status, plus a reason for the variants.

    Bitvavo's `canceledIOC`, `canceledFOK`, `canceledMarketProtection`, ... are `canceled` in the
    contract; which one it was becomes the report's reason.
    """
    if engine_status in _LIVE_STATUSES:
        return engine_status, None
    if engine_status.startswith("canceled"):
        return "canceled", engine_status
    return engine_status, None


def restart_cancellations(open_orders: Mapping[str, str], ts: int) -> tuple[list[ExecutionReport], list[str]]:
    """Final `canceled` reports for the paper orders a previous executor left open.

    `open_orders` is `KEY_PAPER_OPEN` (intent_id -> JSON of that order's last report); each
    cancel carries the order's cumulative fills and fee, and no new fills. Returns the reports
    and the intent ids whose stored report could not be read (logged; the caller drops them).
    """
    reports: list[ExecutionReport] = []
    unreadable: list[str] = []
    for intent_id, raw in open_orders.items():
        try:
            fields = orjson.loads(raw)
            if not isinstance(fields, dict):
                raise IntentError("not a JSON object")
            last = ExecutionReport.decode(fields)
        except (orjson.JSONDecodeError, IntentError) as exc:
            log.error("paper order of intent %s: stored report unreadable (%s); dropping it", intent_id, exc)
            unreadable.append(intent_id)
            continue
        reports.append(dataclasses.replace(last, status="canceled", fills=(), reason=RESTART_REASON, ts=ts))
    return reports, unreadable


@dataclass
class PaperStats:
    orders_placed: int = 0
    rejected: int = 0
    book_updates: int = 0
    snapshots: int = 0
    mirror_errors: int = 0  # levels the engine refused (off the tick grid, too many decimals, ...)


class PaperVenue:
    """Venue protocol (trading/orders.py) for dry-run: fills by the shared engine against the live book."""

    dry_run = True

    def __init__(self, *, markets: Sequence[str] = (), rules: Sequence[MarketRules] | None = None,
                 rest_url: str | None = None, ws_url: str | None = None,
                 balances: Mapping[str, Decimal] | None = None, fees: FeeRates = DEFAULT_FEES,
                 book_wait_s: float = 5.0, ws_silence_timeout_s: float = 30.0,
                 clock: Callable[[], int] = now_ms) -> None:
        """`rules` given: no REST call (tests); else GET /markets from `rest_url` at `start()`.
        `ws_url` None: no socket; books are fed through `books` by the caller (tests)."""
        if rules is None and rest_url is None:
            raise ValueError("PaperVenue needs market rules or a REST URL to read them from")
        if book_wait_s < 0:
            raise ValueError("book_wait_s must be >= 0")
        for symbol, amount in (balances or {}).items():
            if not amount.is_finite() or amount < 0:
                raise ValueError(f"paper balance of {symbol} must be a finite amount >= 0, got {amount}")
        for name, rate in (("maker", fees.maker), ("taker", fees.taker)):
            if not rate.is_finite() or not -1 < rate < 1:
                raise ValueError(f"the paper {name} fee rate must be a fraction such as 0.0025, got {rate}")
        if fees.taker < 0:
            raise ValueError("the paper taker fee rate must not be negative (only maker rebates exist)")
        self._initial_markets = tuple(markets)
        self._rules_given = list(rules) if rules is not None else None
        self._rest_url = rest_url
        self._ws_url = ws_url
        self._balances = dict(DEFAULT_BALANCES if balances is None else balances)
        self.fees = fees
        self._book_wait_s = book_wait_s
        self._ws_silence_timeout_s = ws_silence_timeout_s
        self._clock = clock
        # The executor checks intents against the same rules (trading/execution/intent_checks.py).
        self.market_rules = MarketRulesBook(self._fetch_rules)
        self.books = LiveBooks([], on_applied=self.on_applied, on_snapshot=self.on_snapshot)
        self.stats = PaperStats()
        self._engine: MatchingEngine | None = None
        self._rules: dict[str, MarketRules] = {}
        self._ws: BitvavoWebSocket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._books_wanted = asyncio.Event()
        # What the mirror was told per market: (side, price) -> size of the exchange book.
        self._mirrored: dict[str, dict[tuple[Side, Decimal], Decimal]] = {}
        self._ever_live: set[str] = set()
        self._live_events: dict[str, asyncio.Event] = {}
        # Open paper orders: order_id -> (fills already reported, status last reported).
        self._reported: dict[str, tuple[int, str]] = {}
        self._dirty: dict[str, Order] = {}  # open paper orders the book touched since the last poll

    @classmethod
    def from_settings(cls, settings: Settings, markets: Sequence[str], **options: Any) -> PaperVenue:
        """Public market data only (no credentials): REST rules and the WebSocket `book` channel."""
        return cls(markets=markets, rest_url=settings.bitvavo_rest_url, ws_url=settings.bitvavo_ws_url, **options)

    def _fetch_rules(self) -> list[MarketRules]:
        if self._rules_given is not None:
            return self._rules_given
        assert self._rest_url is not None
        rest = BitvavoRest(self._rest_url)  # public endpoint: never signed
        try:
            return rules_from_markets(rest.markets())
        finally:
            rest.close()

    def hold(self, positions: Mapping[str, Decimal]) -> None:
        """Before `start()`: the paper account holds each market's base `positions` (the paper ledger's), so
        a paper sell of coins bought in an earlier run is judged against what the paper book holds."""
        if self._engine is not None:
            raise RuntimeError("paper holdings are set before the venue starts")
        for market, amount in positions.items():
            if not amount.is_finite() or amount < 0:
                raise ValueError(f"paper holding of {market} must be a finite amount >= 0, got {amount}")
            self._balances[market.partition("-")[0]] = amount

    # -- Venue protocol -----------------------------------------------------------------------

    async def start(self) -> None:
        rules = await self.market_rules.load()
        self._rules = {r.market: r for r in rules}
        engine = MatchingEngine(rules, clock=self._clock, id_factory=lambda: str(uuid.uuid4()),
                                history_limit=_ENGINE_HISTORY)
        engine.open_account(MARKET_ACCOUNT, {}, FeeRates(ZERO, ZERO), unlimited=True)
        engine.open_account(PAPER_ACCOUNT, dict(self._balances), self.fees)
        self._engine = engine
        markets = [m for m in self._initial_markets if m in self._rules]
        unknown = sorted(set(self._initial_markets) - set(markets))
        if unknown:
            log.warning("paper venue: not subscribing %s: not listed by the exchange", ", ".join(unknown))
        for market in markets:
            self._add_market(market)
        if self._ws_url is not None:
            governor = shared_governor(budget_identity(self._rest_url or self._ws_url))
            self._ws = BitvavoWebSocket(self._ws_url, on_event=self.on_event, on_disconnect=self.books.reset_all,
                                        governor=governor, silence_timeout_s=self._ws_silence_timeout_s)
            self.books.attach(self._ws)
            if markets:
                await self._ws.subscribe("book", markets)
            self._tasks = [asyncio.create_task(self._ws.run(), name="paper-book-feed"),
                           asyncio.create_task(self._keep_books_synced(self._ws), name="paper-book-snapshots")]
            for task in self._tasks:
                # Without its feed no book is live: orders are refused, and poll() raises the cause.
                task.add_done_callback(lambda _task: self.books.reset_all())
        log.info("paper venue: %d markets listed, books for %s, balances %s, fees maker %s taker %s",
                 len(self._rules), ", ".join(markets) or "none yet", self._balances, self.fees.maker, self.fees.taker)

    async def best_price(self, market: str, side: Side) -> Decimal | None:
        """The mirror's best opposite price, the one the engine values a market order by amount at."""
        engine = self._started()
        if market not in self._rules:
            return None
        best = engine.best_ask(market) if side == "buy" else engine.best_bid(market)
        return None if best is None else best[0]

    def blocked_reason(self) -> str | None:
        return None  # paper orders are refused per market (book not in sync), never all at once

    async def submit(self, intent: Intent) -> list[ExecutionReport]:
        engine = self._started()
        rules = self._rules.get(intent.market)
        if rules is None:
            raise IntentError(f"unknown market {intent.market!r}: the exchange does not list it")
        if not intent.dry_run:
            raise ValueError(f"live intent {intent.intent_id} reached the paper venue")
        known = self._known_order(engine, intent)
        if known is not None:
            # The same intent again (its first report never committed): its state, every fill.
            self._reported.pop(known.order_id, None)
            report = self._report(known, force=True)
            assert report is not None
            return [report]
        refusal = await self._wait_for_book(intent.market)
        if refusal is not None:
            return [self._rejected(intent, rules, refusal)]
        request = OrderRequest(market=intent.market, side=intent.side, order_type=intent.order_type,
                               amount=intent.amount, amount_quote=intent.amount_quote, price=intent.price,
                               time_in_force=intent.time_in_force if intent.order_type == "limit" else "GTC",
                               client_order_id=intent.intent_id)
        try:
            result = engine.place(PAPER_ACCOUNT, request)
        except BitvavoError as exc:
            return [self._rejected(intent, rules, str(exc))]
        self.stats.orders_placed += 1
        self._touched(result.touched_orders)
        report = self._report(result.order, force=True)
        assert report is not None
        return [report]

    async def poll(self) -> list[ExecutionReport]:
        self._check_feed()
        dirty, self._dirty = self._dirty, {}
        reports = [self._report(order) for order in dirty.values()]
        return [r for r in reports if r is not None]

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a task that ignores its cancel must not keep the executor's segment from ending.
            # (asyncio.wait, not suppress(CancelledError): a cancel of close() itself still propagates.)
            _done, stuck = await asyncio.wait(self._tasks, timeout=CLOSE_WAIT_S)
            for task in stuck:
                log.error("paper venue: background task %s did not stop when cancelled", task.get_name())
        self.books.reset_all()

    # -- state for metrics and tests ----------------------------------------------------------

    @property
    def engine(self) -> MatchingEngine:
        return self._started()

    @property
    def open_orders(self) -> int:
        return len(self._reported)

    def book_live(self, market: str) -> bool:
        sync = self.books.syncs.get(market)
        return sync is not None and sync.is_live

    # -- book feed (LiveBooks callbacks; the hot path) -----------------------------------------

    def on_event(self, frame: dict[str, Any]) -> None:
        if frame.get("event") == "book":
            self.books.on_book_event(frame)

    def on_applied(self, sync: BookSync, frame: dict[str, Any], bid: Level | None, ask: Level | None) -> None:
        """Sync the levels this update changed: the book's size now at each price it named."""
        book = sync.book
        changes: list[tuple[Side, Decimal, Decimal]] = []
        for key, side in _FRAME_SIDES:
            levels = frame.get(key)
            if levels:
                for entry in levels:
                    price = parse_price(entry[0])  # BookSync applied the frame: every entry is well-formed
                    changes.append((side, price, book.size_at(side, price)))
        self.stats.book_updates += 1
        self._mirror(sync.market, changes)

    def on_snapshot(self, sync: BookSync, snapshot: BookSnapshot) -> None:
        """A (re)synced book replaces the mirror of that market in full (levels gone while it was invalid too)."""
        market = sync.market
        wanted: dict[tuple[Side, Decimal], Decimal] = {("buy", p): s for p, s in sync.book.bids()}
        wanted.update({("sell", p): s for p, s in sync.book.asks()})
        changes = [(side, price, ZERO) for side, price in self._mirrored.get(market, {}) if (side, price) not in wanted]
        changes.extend((side, price, size) for (side, price), size in wanted.items())
        self.stats.snapshots += 1
        self._mirror(market, changes)
        self._ever_live.add(market)
        event = self._live_events.get(market)
        if event is not None:
            event.set()

    async def _keep_books_synced(self, ws: BitvavoWebSocket) -> None:
        """Ask for the snapshot of every book that is not live, while connected.

        LiveBooks asks when a market's first update arrives; a quiet market would wait for that
        indefinitely, and a market subscribed on demand should not wait at all.
        """
        while True:
            await ws.wait_connected()
            for market, sync in self.books.syncs.items():
                if not sync.is_live:
                    # LiveBooks' own fetch (backoff, ban handling); a no-op while one is in flight.
                    self.books._ensure_snapshot(market)
            self._books_wanted.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_RESNAPSHOT_S):  # not wait_for: on 3.11 it can swallow a cancel
                    await self._books_wanted.wait()

    def _mirror(self, market: str, changes: Iterable[tuple[Side, Decimal, Decimal]]) -> None:
        engine = self._engine
        if engine is None or market not in self._rules:
            return
        mirrored = self._mirrored.setdefault(market, {})
        # Shrinking levels first, growing ones after: the mirror never crosses itself midway.
        shrinking: list[tuple[Side, Decimal, Decimal]] = []
        growing: list[tuple[Side, Decimal, Decimal]] = []
        for change in changes:
            (shrinking if change[2] < mirrored.get((change[0], change[1]), ZERO) else growing).append(change)
        for side, price, size in shrinking + growing:
            try:
                result = engine.set_liquidity_level(MARKET_ACCOUNT, market, side, price, size)
            except BitvavoError as exc:
                self.stats.mirror_errors += 1
                if worth_logging(self.stats.mirror_errors):
                    log.warning("paper mirror %s: level %s %s size %s refused (%d so far): %s", market, side, price,
                                size, self.stats.mirror_errors, exc)
                continue
            if size:
                mirrored[(side, price)] = size
            else:
                mirrored.pop((side, price), None)
            if result is not None and result.touched_orders:
                self._touched(result.touched_orders)

    # -- orders and reports --------------------------------------------------------------------

    def _touched(self, orders: Iterable[Order]) -> None:
        for order in orders:
            if order.account_id == PAPER_ACCOUNT and order.order_id in self._reported:
                self._dirty[order.order_id] = order

    def _report(self, order: Order, *, force: bool = False) -> ExecutionReport | None:
        """The order's state with the fills not reported yet; None when nothing changed."""
        seen, last_status = self._reported.get(order.order_id, (0, ""))
        status, reason = contract_status(order.status)
        new_fills = order.fills[seen:]
        if not force and not new_fills and status == last_status:
            return None
        intent_id = order.client_order_id or ""
        fills = tuple(FillRecord(fill_id=paper_fill_id(order.order_id, seen + offset), ts=fill.timestamp,
                                 amount=fill.amount, price=fill.price, fee=fill.fee,
                                 fee_currency=fill.fee_currency, taker=fill.taker)
                      for offset, fill in enumerate(new_fills))
        if status in FINAL_STATUSES:
            self._reported.pop(order.order_id, None)
            self._dirty.pop(order.order_id, None)
        else:
            self._reported[order.order_id] = (len(order.fills), status)
        return ExecutionReport(intent_id=intent_id, order_id=order.order_id, market=order.market, side=order.side,
                               status=status, filled_amount=order.filled_amount,
                               filled_amount_quote=order.filled_amount_quote, fee=order.fee_paid,
                               fee_currency=order.fee_currency, dry_run=True, ts=self._clock(), fills=fills,
                               reason=reason)

    def _rejected(self, intent: Intent, rules: MarketRules, reason: str) -> ExecutionReport:
        self.stats.rejected += 1
        return ExecutionReport(intent_id=intent.intent_id, order_id="", market=intent.market, side=intent.side,
                               status="rejected", filled_amount=ZERO, filled_amount_quote=ZERO, fee=ZERO,
                               fee_currency=rules.quote, dry_run=True, ts=self._clock(), reason=reason)

    @staticmethod
    def _known_order(engine: MatchingEngine, intent: Intent) -> Order | None:
        try:
            return engine.get_order(PAPER_ACCOUNT, intent.market, client_order_id=intent.intent_id)
        except BitvavoError:
            return None

    async def _wait_for_book(self, market: str) -> str | None:
        """None when the market's book is live; else why the order is refused."""
        sync = self.books.syncs.get(market)
        if sync is None:
            self._add_market(market)
            if self._ws is not None:
                await self._ws.subscribe("book", [market])
                self._books_wanted.set()
            sync = self.books.syncs[market]
        if sync.is_live:
            return None
        if market in self._ever_live:
            return NOT_IN_SYNC  # it was live and broke: never fill against what it was
        event = self._live_events.setdefault(market, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._book_wait_s):
                await event.wait()
        if sync.is_live:
            return None
        return NO_LIVE_BOOK if market not in self._ever_live else NOT_IN_SYNC

    def _add_market(self, market: str) -> None:
        self.books.add_market(market)
        self._live_events.setdefault(market, asyncio.Event())

    def _started(self) -> MatchingEngine:
        if self._engine is None:
            raise RuntimeError("PaperVenue.start() has not run")
        return self._engine

    def _check_feed(self) -> None:
        """The book feed tasks only end on close(); if one died, say so instead of trading blind."""
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"paper venue: {task.get_name()} stopped") from task.exception()
