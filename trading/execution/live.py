"""The live venue: intents become Bitvavo orders, none lost and none sent twice (design §3, §10).

Redis state, all of it written by this module except the HDEL that records a report:

- `orders:inflight` (`KEY_INFLIGHT`) intent_id -> JSON {intent fields, sent_ms}: written, and
  acknowledged by Redis, BEFORE the order is sent, and written again before any later report about
  the order leaves the venue. The executor HDELs it in the transaction that records the report, so
  an entry present means "a report about this order may not be recorded": the venue rebuilds it
  from the exchange (reconciliation) instead of trusting its own memory.
- `orders:live:open` (`KEY_LIVE_OPEN`) intent_id -> JSON {intent, sent_ms, order_id, confirmed,
  pending}: what was reported about each order (status, cumulative amounts and fee, fill ids).
  `pending` is the state after the last report handed out; it becomes `confirmed` once the
  executor has recorded that report (its in-flight entry is gone). Kept until the order is final
  and its final report recorded. Reports carry only fills whose ids are not in `confirmed`.
- `orders:live:sent:<intent_id>` (7 days): this intent was sent once; it is never sent again.

An order call that times out or gets a 5xx is looked up by clientOrderId (= intent_id), with
spaced retries, never resent. "Not found" (error 240) counts only once the request can no longer
reach the matching engine: Bitvavo refuses a request older than its access window (error 304),
so after `sent_ms + access window + margin` a missing order was not created and the intent gets a
`rejected` report. It is not resent with the same clientOrderId because the exchange rejects a
duplicate clientOrderId only while the first order is OPEN (error 220): a resend after the first
order filled or was cancelled would be a second order.

The send claim re-checks the kill switch and the go-live gate atomically with the in-flight write.
A flatten sale (`Intent.purpose`) passes both there, within its cap: scope `ledger`, the live
ledger's position of the market (`trading:pnl:live`); scope `account`, the exchange's own check
of the available balance.

The claim is fenced by the executor's lease (`fence()`, trading/lease.py): it goes through only
while `lease:executor:fencing` is the token this instance holds now (re-read at every send, so a
re-acquisition after a Redis restart counts). Another instance that acquired the lease since moved
the counter on: nothing is claimed or sent, a critical `send_fenced` event says so, and
`SendFencedError` is raised; the intent stays unacknowledged for the instance that holds the lease
(the executor records nothing for it). A venue never fenced sends nothing (`blocked_reason()`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, Literal, TypeVar

import orjson
import redis.asyncio

from trading.bus import KEY_GOLIVE, KEY_INFLIGHT, KEY_KILL, KEY_LIVE_OPEN, KEY_PNL_LIVE
from trading.clock import now_ms
from trading.config import Settings
from trading.decimals import DecimalParseError, format_decimal, parse_decimal
from trading.events import Severity, queue_event
from trading.exchange.errors import (
    BitvavoError,
    ExchangeUnavailableError,
    OrderNotFoundError,
    OutcomeUncertainError,
    RateLimitBannedError,
)
from trading.exchange.governor import RateBudgetExhaustedError
from trading.exchange.market_rules import rules_from_markets
from trading.exchange.models import Order, PayloadError
from trading.exchange.rest import BitvavoRest
from trading.execution.market_rules_book import MarketRulesBook
from trading.lease import Lease, LeaseLostError
from trading.orders import (
    FINAL_STATUSES,
    ExecutionReport,
    FillRecord,
    Intent,
    IntentError,
    OrderOutcomeUnknownError,
    Side,
)

log = logging.getLogger(__name__)

# KEYS: in-flight hash, sent marker, kill switch, go-live hash, live ledger hash, the lease's fencing counter.
# ARGV: intent_id, in-flight JSON, sent_ms, TTL s, what passes: 'trade' (kill switch off and gate open) or a
# flatten sale's scope, 'ledger' (within the live ledger's position field ARGV[6]: ARGV[7] <= it) or 'account'
# (the exchange caps it at the available balance); ARGV[8] our fencing token. The fence comes first: an instance
# that lost the lease neither sends nor looks up an intent another may be handling. tonumber gives a double;
# rounding is monotonic, so an amount <= the position in decimals is never refused.
_CLAIM_SEND_LUA = """
local fence = redis.call('GET', KEYS[6])
if fence ~= ARGV[8] then return 'fenced ' .. (fence or 'unset') end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'sent' end
if ARGV[5] == 'trade' then
  if redis.call('GET', KEYS[3]) == '1' then return 'kill switch is on (trading:kill=1)' end
  local gate = redis.call('HMGET', KEYS[4], 'decision', 'valid_until_ms')
  if gate[1] ~= 'GO' or not tonumber(gate[2]) or tonumber(gate[2]) <= tonumber(ARGV[3]) then
    return 'live gate closed (no fresh GO decision)'
  end
elseif ARGV[5] == 'ledger' then
  local position = tonumber(redis.call('HGET', KEYS[5], ARGV[6]) or '')
  if not position or position < tonumber(ARGV[7]) then
    return 'flatten sale beyond the live ledger position'
  end
elseif ARGV[5] ~= 'account' then
  return 'unknown send claim ' .. ARGV[5]
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
return 'ok'
"""
SENT_PREFIX = "orders:live:sent:"
SENT_TTL_S = 7 * 24 * 3600
# Share of the 1000/minute weight budget that following open orders may use (get_order costs 1).
POLL_WEIGHT_PER_MINUTE = 300
RECONCILE_RETRY_FIRST_MS = 500  # after a failed reconciliation; doubles up to reconcile_interval_s
EVENT_RECONCILE = "reconcile"
EVENT_UNCERTAIN = "order_uncertain"
EVENT_FENCED = "send_fenced"
ZERO = Decimal(0)

NOT_IN_ACCESS_WINDOW = 304
# The exchange cannot answer now; asking again later may work.
_TRANSIENT = (OutcomeUncertainError, ExchangeUnavailableError, RateLimitBannedError, RateBudgetExhaustedError,
              PayloadError)
_PASS_THROUGH = frozenset({"new", "partiallyFilled", "awaitingTrigger", "filled", "expired", "rejected"})

T = TypeVar("T")
Source = Literal["submit", "poll"]


def quote_currency(market: str) -> str:
    return market.rsplit("-", 1)[1]


def contract_status(exchange_status: str) -> tuple[str, str | None]:
    """Bitvavo's order status as an execution-report status, plus the detail the mapping drops."""
    if exchange_status in _PASS_THROUGH:
        return exchange_status, None
    if exchange_status.startswith("cancel"):  # canceledIOC, canceledFOK, canceledPostOnly, canceledAuction, ...
        return "canceled", None if exchange_status == "canceled" else exchange_status
    # Unknown to this code: keep following the order rather than guess that it is over.
    return "new", f"unrecognised exchange status {exchange_status!r}"


def _dec(data: Mapping[str, Any], name: str) -> Decimal:
    try:
        return parse_decimal(data[name], name)
    except (KeyError, DecimalParseError) as exc:
        raise ValueError(f"{name}: {exc}") from None


@dataclass(frozen=True)
class OrderState:
    """What has been reported about one order."""

    status: str
    filled_amount: Decimal = ZERO
    filled_amount_quote: Decimal = ZERO
    fee: Decimal = ZERO
    fee_currency: str = "EUR"
    fill_ids: tuple[str, ...] = ()

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "filled_amount": format_decimal(self.filled_amount),
                "filled_amount_quote": format_decimal(self.filled_amount_quote), "fee": format_decimal(self.fee),
                "fee_currency": self.fee_currency, "fill_ids": list(self.fill_ids)}

    @classmethod
    def from_json(cls, data: Any) -> OrderState:
        if not isinstance(data, dict) or not isinstance(data.get("fill_ids"), list):
            raise ValueError(f"order state must be an object with fill_ids, got {data!r}")
        return cls(status=str(data["status"]), filled_amount=_dec(data, "filled_amount"),
                   filled_amount_quote=_dec(data, "filled_amount_quote"), fee=_dec(data, "fee"),
                   fee_currency=str(data["fee_currency"]), fill_ids=tuple(str(i) for i in data["fill_ids"]))


@dataclass(frozen=True)
class TrackedOrder:
    """An order at the exchange this venue follows (`orders:live:open`)."""

    intent: Intent
    sent_ms: int
    order_id: str
    confirmed: OrderState | None  # recorded by the executor
    pending: OrderState | None  # handed out; recording not yet observed

    @property
    def intent_id(self) -> str:
        return self.intent.intent_id

    def to_json(self) -> bytes:
        return orjson.dumps({"intent": self.intent.encode(), "sent_ms": self.sent_ms, "order_id": self.order_id,
                             "confirmed": None if self.confirmed is None else self.confirmed.to_json(),
                             "pending": None if self.pending is None else self.pending.to_json()})

    @classmethod
    def from_json(cls, raw: str | bytes) -> TrackedOrder:
        try:
            data = orjson.loads(raw)
            return cls(intent=Intent.decode(data["intent"]), sent_ms=int(data["sent_ms"]),
                       order_id=str(data["order_id"]),
                       confirmed=None if data["confirmed"] is None else OrderState.from_json(data["confirmed"]),
                       pending=None if data["pending"] is None else OrderState.from_json(data["pending"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:  # IntentError is a ValueError
            raise ValueError(f"unreadable {KEY_LIVE_OPEN} entry: {exc}") from None


def inflight_json(intent: Intent, sent_ms: int) -> bytes:
    return orjson.dumps({**intent.encode(), "sent_ms": sent_ms})


def parse_inflight(raw: str | bytes) -> tuple[Intent, int]:
    """The intent and send time of an `orders:inflight` entry; `IntentError` when unreadable."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise IntentError(f"in-flight entry is not JSON: {raw[:80]!r}") from None
    if not isinstance(data, dict) or not isinstance(data.get("sent_ms"), int):
        raise IntentError("in-flight entry lacks an integer sent_ms")
    sent_ms = data.pop("sent_ms")
    return Intent.decode(data), sent_ms


def advance(intent: Intent, order: Order, base: OrderState | None) -> tuple[ExecutionReport | None, OrderState]:
    """The report of what changed since `base` (None when nothing did) and the state after it.

    Only fills not in `base` are reported, each once. A fill whose fee is not settled yet waits for
    a later poll, and while one waits the report never says final, so the final report carries
    every fill.
    """
    seen = set(base.fill_ids) if base is not None else set()
    currency = base.fee_currency if base is not None else str(order.extra.get("feeCurrency")
                                                              or quote_currency(intent.market))
    new: list[FillRecord] = []
    waiting = False
    for fill in order.fills:
        if fill.fill_id in seen:
            continue
        if fill.fee is None or not fill.settled:
            waiting = True
            continue
        seen.add(fill.fill_id)
        new.append(FillRecord(fill_id=fill.fill_id, ts=fill.timestamp, amount=fill.amount, price=fill.price,
                              fee=fill.fee, fee_currency=fill.fee_currency or currency, taker=fill.taker))
    filled = (base.filled_amount if base else ZERO) + sum((f.amount for f in new), ZERO)
    filled_quote = (base.filled_amount_quote if base else ZERO) + sum((f.amount * f.price for f in new), ZERO)
    fee = (base.fee if base else ZERO) + sum((f.fee for f in new), ZERO)
    status, reason = contract_status(order.status)
    if waiting and status in FINAL_STATUSES:
        status, reason = ("partiallyFilled" if filled else "new"), None
    state = OrderState(status, filled, filled_quote, fee, currency,
                       (base.fill_ids if base else ()) + tuple(f.fill_id for f in new))
    if base is not None and not new and status == base.status:
        return None, state
    report = ExecutionReport(intent_id=intent.intent_id, order_id=order.order_id, market=intent.market,
                             side=intent.side, status=status, filled_amount=filled, filled_amount_quote=filled_quote,
                             fee=fee, fee_currency=currency, dry_run=False, ts=order.updated, fills=tuple(new),
                             reason=reason)
    return report, state


def rejected_report(intent: Intent, reason: str, ts: int) -> ExecutionReport:
    return ExecutionReport(intent_id=intent.intent_id, order_id="", market=intent.market, side=intent.side,
                           status="rejected", filled_amount=ZERO, filled_amount_quote=ZERO, fee=ZERO,
                           fee_currency=quote_currency(intent.market), dry_run=False, ts=ts, reason=reason)


def _transient(exc: Exception) -> bool:
    """The exchange cannot answer now; asking again later may. 304: the request arrived outside the access
    window (a clock offset being re-measured, a request held up in transit), so it was not even read."""
    return isinstance(exc, _TRANSIENT) or (isinstance(exc, BitvavoError) and exc.error_code == NOT_IN_ACCESS_WINDOW)


def _uncertain(exc: BitvavoError) -> bool:
    """The order may exist: timeouts, 5xx, and 220 (the clientOrderId is taken by an open order)."""
    return (isinstance(exc, OutcomeUncertainError | ExchangeUnavailableError)
            or (exc.http_status or 0) >= 500 or exc.error_code == 220)


@dataclass(frozen=True)
class Mismatch:
    """One disagreement between our records and the exchange; while any exists, live orders are refused."""

    kind: str  # unknown_open_order, tracked_order_missing, balance_in_order, unreadable_state, reconcile_incomplete
    key: str
    detail: dict[str, Any]
    market: str | None = None
    intent_id: str | None = None

    @property
    def ident(self) -> str:
        return f"{self.kind}:{self.key}"


class SendFencedError(LeaseLostError):
    """The send claim found the lease's fencing counter at another token than this instance's: another executor
    acquired the lease. Nothing was claimed or sent; the intent is the lease holder's now."""


@dataclass
class LiveVenueStats:
    orders_sent: int = 0
    fenced: int = 0  # sends refused by the lease fence
    refused_by_exchange: int = 0
    outcome_uncertain: int = 0
    found_by_lookup: int = 0
    not_created: int = 0
    reconciles: int = 0
    mismatches_found: int = 0
    last_balances: dict[str, dict[str, str]] = field(default_factory=dict)


class LiveVenue:
    """`Venue` over `BitvavoRest` (see the module doc for the state it keeps in Redis)."""

    dry_run = False

    def __init__(self, client: redis.asyncio.Redis, settings: Settings, *, rest: BitvavoRest | None = None,
                 request_timeout_s: float = 10.0, uncertainty_margin_ms: int = 5_000,
                 lookup_grace_ms: int = 30_000, poll_interval_s: float = 1.0,
                 reconcile_interval_s: float = 15.0) -> None:
        self._owns_rest = rest is None
        if rest is None:
            if settings.bitvavo_api_key is None or settings.bitvavo_api_secret is None:
                raise ValueError("live trading needs BITVAVO_API_KEY and BITVAVO_API_SECRET")
            rest = BitvavoRest(settings.bitvavo_rest_url, api_key=settings.bitvavo_api_key,
                               api_secret=settings.bitvavo_api_secret, operator_id=settings.bitvavo_operator_id,
                               timeout_s=request_timeout_s, access_window_ms=settings.bitvavo_access_window_ms)
        if rest.operator_id is None:
            raise ValueError("live trading needs BITVAVO_OPERATOR_ID (mandatory on Bitvavo order calls)")
        self._client: Any = client  # redis-py's async stubs type replies as sync|async unions
        self._claim_send = client.register_script(_CLAIM_SEND_LUA)
        self._rest = rest
        self._margin_ms = uncertainty_margin_ms
        self._grace_ms = lookup_grace_ms
        self._poll_interval_ms = int(poll_interval_s * 1000)
        self._reconcile_interval_ms = int(reconcile_interval_s * 1000)
        self.stats = LiveVenueStats()
        self._lock = asyncio.Lock()  # one venue operation at a time: no two reports about one order race
        self._started = False
        self._mismatches: dict[str, Mismatch] = {}
        # GET /markets over this venue's client; the executor checks intents against it.
        self.market_rules = MarketRulesBook(lambda: rules_from_markets(rest.markets()))
        self._unresolved: dict[str, str] = {}  # intent_id -> why its order's outcome is unknown
        self._ready: dict[str, ExecutionReport] = {}  # found by reconciliation, handed out by the next poll()
        self._handed_out: dict[str, Source] = {}  # a report left the venue; its recording not yet seen
        self._next_poll_ms = 0
        self._next_reconcile_ms = 0
        self._reconcile_retry_ms = RECONCILE_RETRY_FIRST_MS  # the next wait after a reconciliation that failed
        self._lease: Lease | None = None  # fences every send (fence())

    def __repr__(self) -> str:
        return f"LiveVenue({self._rest!r})"

    def fence(self, lease: Lease) -> None:
        """Send only while `lease` (the executor's) is held: its latest acquisition's token is checked at every
        send claim (module docstring)."""
        self._lease = lease

    # -- Venue protocol ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Reconcile with the exchange before accepting orders (`blocked_reason()` says how it went)."""
        async with self._lock:
            try:
                offset = await self._call(self._rest.sync_clock)
                log.info("live venue: exchange clock offset %d ms", offset)
            except (*_TRANSIENT, BitvavoError) as exc:
                log.warning("live venue: clock sync failed (%s); reconciliation will say more", exc)
            await self._reconcile(first=True)
            self._started = True
        log.info("live venue started: %s", self.blocked_reason() or "reconciled, accepting orders")

    def blocked_reason(self) -> str | None:
        if not self._started:
            return "live venue not started: reconciliation with the exchange has not run"
        if self._lease is None:
            return "live venue not fenced: only the executor, holding its lease, sends live orders"
        problems = []
        if not self.market_rules.loaded:
            problems.append("market rules (GET /markets) not loaded yet")
        if self._unresolved:
            ids = sorted(self._unresolved)
            problems.append(f"{len(ids)} order(s) whose outcome is unknown ({', '.join(ids[:3])})")
        if self._mismatches:
            shown = "; ".join(m.ident for m in list(self._mismatches.values())[:3])
            problems.append(f"{len(self._mismatches)} reconciliation mismatch(es): {shown}")
        return "live orders refused until reconciled: " + "; ".join(problems) if problems else None

    async def submit(self, intent: Intent) -> list[ExecutionReport]:
        """Send the intent's order once; an intent sent before is looked up, never sent again.

        Returns [] when the intent's order was already reported and recorded (poll() follows it).
        """
        if intent.dry_run:
            raise IntentError("a dry-run intent reached the live venue")
        async with self._lock:
            return await self._submit(intent)

    async def poll(self) -> list[ExecutionReport]:
        """Reconciliation results, then new fills and final states of the open orders we follow."""
        async with self._lock:
            if not self._started:
                return []
            now = now_ms()
            if (self._mismatches or self._unresolved) and now >= self._next_reconcile_ms:
                await self._reconcile(first=False)
            reports = list(self._ready.values())
            self._handed_out.update(dict.fromkeys(self._ready, "poll"))
            self._ready.clear()
            if now >= self._next_poll_ms:
                reports.extend(await self._follow_open_orders())
            return reports

    async def best_price(self, market: str, side: Side) -> Decimal | None:
        """The exchange's best ask (buy) or bid (sell) from GET /ticker/book; None when it cannot say."""
        try:
            row = await self._call(self._rest.ticker_book, market)
            price = row.get("ask" if side == "buy" else "bid") if isinstance(row, dict) else None
            return None if price is None else parse_decimal(price, f"{market} best price")
        except (*_TRANSIENT, BitvavoError, DecimalParseError) as exc:
            log.warning("live venue: best price of %s unknown: %s: %s", market, type(exc).__name__, exc)
            return None

    async def reconcile(self) -> list[Mismatch]:
        """Re-run reconciliation (the venue also does it from poll() while blocked); the open mismatches."""
        async with self._lock:
            await self._reconcile(first=False)
            return list(self._mismatches.values())

    async def close(self) -> None:
        if self._owns_rest:
            await self._call(self._rest.close)

    # -- submit -----------------------------------------------------------------------------------

    async def _submit(self, intent: Intent) -> list[ExecutionReport]:
        intent_id = intent.intent_id
        ready = self._ready.pop(intent_id, None)
        if ready is not None:  # reconciliation found it: this is its report
            self._handed_out[intent_id] = "submit"
            return [ready]
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hget(KEY_INFLIGHT, intent_id)
            pipe.hget(KEY_LIVE_OPEN, intent_id)
            pipe.exists(SENT_PREFIX + intent_id)
            inflight_raw, tracked_raw, sent = await pipe.execute()
        if inflight_raw is not None:
            if self._handed_out.get(intent_id) == "poll":
                return []  # the executor is recording poll()'s report about it
            try:
                sent_ms = parse_inflight(inflight_raw)[1]
            except IntentError:
                sent_ms = 0  # unreadable: treat the send as long past
            tracked = TrackedOrder.from_json(tracked_raw) if tracked_raw is not None else None
            report = await self._resolve(intent, sent_ms, tracked, "submit")
            return [report] if report is not None else []
        if tracked_raw is not None or sent:
            return []  # sent before and reported: poll() follows it
        blocked = self.blocked_reason()
        if blocked is not None:
            return [rejected_report(intent, f"not sent: {blocked}", now_ms())]
        report = await self._send(intent)
        return [report] if report is not None else []

    async def _send(self, intent: Intent) -> ExecutionReport | None:
        intent_id = intent.intent_id
        sent_ms = now_ms()
        passes = "trade"
        if intent.purpose == "flatten":
            shape = intent.flatten_shape_error()
            if shape is not None:
                return rejected_report(intent, f"not sent: {shape}", sent_ms)
            passes = intent.scope or "ledger"
        # One atomic step, acknowledged by Redis before anything goes to the exchange: refuse when the
        # kill switch is on or the gate closed, or a flatten sale exceeds the ledger position (checked here,
        # after any wait for the lock, not only by the executor earlier), and claim the send so that no other
        # instance (one that took over after a stall cost us the lease) can send the same clientOrderId again;
        # refuse outright when such an instance exists (the fence).
        assert self._lease is not None  # blocked_reason() refused an unfenced venue before this
        held = self._lease.current()
        verdict = await self._claim_send(
            keys=[KEY_INFLIGHT, SENT_PREFIX + intent_id, KEY_KILL, KEY_GOLIVE, KEY_PNL_LIVE, held.fencing_key],
            args=[intent_id, inflight_json(intent, sent_ms), sent_ms, SENT_TTL_S, passes,
                  f"{intent.market}:position", format_decimal(intent.amount) if intent.amount is not None else "",
                  held.fencing_token])
        if verdict.startswith("fenced "):
            await self._refuse_fenced(intent, held, verdict.removeprefix("fenced "))
        if verdict == "sent":  # claimed before: look it up, never send twice
            inflight_raw = await self._client.hget(KEY_INFLIGHT, intent_id)
            earlier = parse_inflight(inflight_raw)[1] if inflight_raw is not None else 0
            return await self._resolve(intent, earlier, None, "submit")
        if verdict != "ok":
            return rejected_report(intent, f"not sent: {verdict}", now_ms())
        self.stats.orders_sent += 1
        try:
            try:
                order = await self._call(self._place, intent)
            except BitvavoError as exc:
                if _uncertain(exc):
                    # The request was signed at the latest now (the rate governor may have held it after
                    # sent_ms): count the exchange's access window from here, here and after a restart.
                    caught_ms = now_ms()
                    await self._client.hset(KEY_INFLIGHT, intent_id, inflight_json(intent, caught_ms))
                    return await self._after_uncertain(intent, caught_ms, exc)
                self.stats.refused_by_exchange += 1
                report = rejected_report(intent, f"exchange refused the order: [{exc.error_code}] {exc.message}",
                                         now_ms())
                await self._hand_out(report, intent, sent_ms, None, "submit")
                return report
            except RateBudgetExhaustedError as exc:  # the governor refused before anything was sent
                report = rejected_report(intent, f"not sent: {exc}", now_ms())
                await self._hand_out(report, intent, sent_ms, None, "submit")
                return report
            report_or_none, state = advance(intent, order, None)
            assert report_or_none is not None  # a first report always exists
            await self._hand_out(report_or_none, intent, sent_ms,
                                 TrackedOrder(intent, sent_ms, order.order_id, None, state), "submit")
            return report_or_none
        except BaseException as exc:
            # Whatever went wrong after the in-flight write, the entry is left for reconciliation.
            self._unresolved.setdefault(intent_id, f"{type(exc).__name__} after sending")
            raise

    async def _refuse_fenced(self, intent: Intent, held: Lease, counter: str) -> None:
        self.stats.fenced += 1
        detail = (f"not sent: lease {held.name!r} fencing counter is {counter}, this instance holds token "
                  f"{held.fencing_token}: another executor acquired the lease")
        log.error("live venue: intent %s %s", intent.intent_id, detail)
        await self._emit([(EVENT_FENCED, Severity.CRITICAL, intent.market, intent.intent_id,
                           {"reason": detail, "counter": counter, "token": held.fencing_token,
                            "action": "left for the lease holder"})])
        raise SendFencedError(f"intent {intent.intent_id}: {detail}")

    def _place(self, intent: Intent) -> Order:
        return self._rest.place_order(
            intent.market, intent.side, intent.order_type, amount=intent.amount, amount_quote=intent.amount_quote,
            price=intent.price, time_in_force=intent.time_in_force if intent.order_type == "limit" else None,
            client_order_id=intent.intent_id)

    async def _after_uncertain(self, intent: Intent, sent_ms: int, exc: BitvavoError) -> ExecutionReport:
        self.stats.outcome_uncertain += 1
        log.warning("live venue: order %s outcome uncertain ([%d] %s); looking it up by clientOrderId",
                    intent.intent_id, exc.error_code, exc.message)
        report = await self._resolve(intent, sent_ms, None, "submit")
        assert report is not None  # no recorded state yet: there is always a first report
        await self._emit([(EVENT_UNCERTAIN, Severity.WARNING, intent.market, intent.intent_id,
                           {"error_code": exc.error_code, "error": exc.message,
                            "outcome": "not_created" if report.status == "rejected" and not report.order_id
                            else "found", "status": report.status, "order_id": report.order_id})])
        return report

    # -- looking orders up ------------------------------------------------------------------------

    async def _resolve(self, intent: Intent, sent_ms: int, tracked: TrackedOrder | None,
                       source: Source | None) -> ExecutionReport | None:
        """What the exchange has for an intent in flight; hands the report out (or keeps it for poll()).

        `source` None: reconciliation, the report waits in `_ready` for the next poll().
        """
        intent_id = intent.intent_id
        if tracked is not None:
            try:
                order: Order | None = await self._ask(intent_id, lambda: self._rest.get_order(
                    intent.market, order_id=tracked.order_id))
            except OrderNotFoundError:
                self._unresolved[intent_id] = f"order {tracked.order_id} is unknown to the exchange (240)"
                raise OrderOutcomeUnknownError(self._unresolved[intent_id]) from None
            base = tracked.confirmed
        else:
            order = await self._lookup(intent, sent_ms)
            base = None
        self._unresolved.pop(intent_id, None)
        if order is None:
            self.stats.not_created += 1
            window = self._rest.access_window_ms + self._margin_ms
            report = rejected_report(intent, f"order not created: no order with this clientOrderId at the exchange "
                                             f"{window} ms after sending (error 240); not resent", now_ms())
            await self._hand_out(report, intent, sent_ms, None, source)
            return report
        if tracked is None:
            self.stats.found_by_lookup += 1
        change, state = advance(intent, order, base)
        if change is None:  # nothing new since the recorded state: nothing to record either
            async with self._client.pipeline(transaction=True) as tx:
                tx.hdel(KEY_INFLIGHT, intent_id)
                tx.hset(KEY_LIVE_OPEN, intent_id, TrackedOrder(intent, sent_ms, order.order_id, base, None).to_json())
                await tx.execute()
            return None
        await self._hand_out(change, intent, sent_ms, TrackedOrder(intent, sent_ms, order.order_id, base, state),
                             source)
        return change

    async def _lookup(self, intent: Intent, sent_ms: int) -> Order | None:
        """The order with clientOrderId = intent_id, or None once it provably was not created."""
        deadline = sent_ms + self._rest.access_window_ms + self._margin_ms
        delay = 0.2
        while True:
            try:
                return await self._ask(intent.intent_id, lambda: self._rest.get_order(
                    intent.market, client_order_id=intent.intent_id))
            except OrderNotFoundError:
                remaining_s = (deadline - now_ms()) / 1000
                if remaining_s <= 0:
                    return None
            await asyncio.sleep(min(delay, remaining_s))
            delay = min(delay * 2, 2.0)

    async def _ask(self, intent_id: str, call: Callable[[], Order]) -> Order:
        """`call()` with spaced retries while the exchange cannot answer, within `lookup_grace_ms`."""
        give_up = now_ms() + self._grace_ms
        delay = 0.2
        while True:
            try:
                return await self._call(call)
            except OrderNotFoundError:
                raise
            except (*_TRANSIENT, BitvavoError) as exc:
                if not _transient(exc):  # auth, permissions, parameters: asking again will not help
                    self._unresolved[intent_id] = f"lookup refused: {exc}"
                    raise OrderOutcomeUnknownError(f"intent {intent_id}: order lookup refused: {exc}") from None
                if now_ms() + delay * 1000 > give_up:
                    self._unresolved[intent_id] = f"exchange unreachable: {exc}"
                    raise OrderOutcomeUnknownError(
                        f"intent {intent_id}: the exchange could not say whether its order exists: {exc}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    # -- handing reports out ----------------------------------------------------------------------

    async def _hand_out(self, report: ExecutionReport, intent: Intent, sent_ms: int, tracked: TrackedOrder | None,
                        source: Source | None) -> None:
        """Mark the report in flight (and its state pending) before it leaves; the executor HDELs the mark."""
        async with self._client.pipeline(transaction=True) as tx:
            tx.hset(KEY_INFLIGHT, intent.intent_id, inflight_json(intent, sent_ms))
            if tracked is not None:
                tx.hset(KEY_LIVE_OPEN, intent.intent_id, tracked.to_json())
            await tx.execute()
        if source is None:
            self._ready[intent.intent_id] = report
        else:
            self._handed_out[intent.intent_id] = source

    async def _read_state(self) -> tuple[dict[str, str], dict[str, TrackedOrder], list[Mismatch]]:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hgetall(KEY_INFLIGHT)
            pipe.hgetall(KEY_LIVE_OPEN)
            inflight, tracked_raw = await pipe.execute()
        tracked: dict[str, TrackedOrder] = {}
        unreadable: list[Mismatch] = []
        for intent_id, raw in tracked_raw.items():
            try:
                tracked[intent_id] = TrackedOrder.from_json(raw)
            except ValueError as exc:
                unreadable.append(Mismatch("unreadable_state", intent_id, {"key": KEY_LIVE_OPEN, "error": str(exc)},
                                           intent_id=intent_id))
        return inflight, tracked, unreadable

    async def _observe_recorded(self, inflight: Mapping[str, str], tracked: dict[str, TrackedOrder]) -> None:
        """Reports whose in-flight mark the executor removed are recorded: their state becomes confirmed."""
        for intent_id in [i for i in self._handed_out if i not in inflight]:
            del self._handed_out[intent_id]
        confirmed: dict[str, TrackedOrder] = {}
        finished: list[str] = []
        for intent_id, order in list(tracked.items()):
            if order.pending is None or intent_id in inflight:
                continue
            order = replace(order, confirmed=order.pending, pending=None)
            if order.confirmed is not None and order.confirmed.final:
                finished.append(intent_id)
                del tracked[intent_id]
            else:
                confirmed[intent_id] = order
                tracked[intent_id] = order
        if confirmed or finished:
            async with self._client.pipeline(transaction=True) as tx:
                for intent_id, order in confirmed.items():
                    tx.hset(KEY_LIVE_OPEN, intent_id, order.to_json())
                if finished:
                    tx.hdel(KEY_LIVE_OPEN, *finished)
                await tx.execute()

    async def _follow_open_orders(self) -> list[ExecutionReport]:
        inflight, tracked, _ = await self._read_state()
        await self._observe_recorded(inflight, tracked)
        reports: list[ExecutionReport] = []
        followed = 0
        for intent_id, order in tracked.items():
            if intent_id in inflight or order.confirmed is None or order.confirmed.final:
                continue  # its latest report is not recorded yet (or it is done)
            followed += 1
            try:
                current = await self._call(self._rest.get_order, order.intent.market, order_id=order.order_id)
            except OrderNotFoundError:
                await self._add_mismatch(Mismatch("tracked_order_missing", intent_id,
                                                  {"order_id": order.order_id, "error": "240 on get_order"},
                                                  market=order.intent.market, intent_id=intent_id))
                continue
            except _TRANSIENT as exc:
                log.warning("live venue: following open orders paused: %s", exc)
                break
            report, state = advance(order.intent, current, order.confirmed)
            if report is not None:
                await self._hand_out(report, order.intent, order.sent_ms, replace(order, pending=state), "poll")
                reports.append(report)
        # get_order costs 1 weight per order: keep following within our share of the minute's budget.
        spacing_ms = max(self._poll_interval_ms, followed * 60_000 // POLL_WEIGHT_PER_MINUTE)
        self._next_poll_ms = now_ms() + spacing_ms
        return reports

    # -- reconciliation ---------------------------------------------------------------------------

    async def _reconcile(self, *, first: bool) -> None:
        self.stats.reconciles += 1
        found: dict[str, Mismatch] = {}
        summary: dict[str, Any] = {}
        complete = True
        try:
            await self._reconcile_steps(found, summary)
        except (*_TRANSIENT, BitvavoError) as exc:
            # Incomplete: nothing proven either way, so earlier mismatches stay open too.
            complete = False
            for mismatch in self._mismatches.values():
                found.setdefault(mismatch.ident, mismatch)
            incomplete = Mismatch("reconcile_incomplete", "exchange", {"error": f"{type(exc).__name__}: {exc}"})
            found[incomplete.ident] = incomplete
        await self._publish(found, summary, first=first)
        if complete and not self._unresolved:
            self._reconcile_retry_ms = RECONCILE_RETRY_FIRST_MS
            self._next_reconcile_ms = now_ms() + self._reconcile_interval_ms
        else:
            # The exchange did not answer (timeouts, 5xx, 304, a ban): ask again soon, backing off to the
            # interval, so a venue blocked by an outage unblocks within moments of the exchange answering.
            self._next_reconcile_ms = now_ms() + min(self._reconcile_retry_ms, self._reconcile_interval_ms)
            self._reconcile_retry_ms = min(self._reconcile_retry_ms * 2, self._reconcile_interval_ms)

    async def _reconcile_steps(self, found: dict[str, Mismatch], summary: dict[str, Any]) -> None:
        if not self.market_rules.loaded:  # the executor's checks need them before any order
            await self.market_rules.load()
        inflight, tracked, unreadable = await self._read_state()
        for mismatch in unreadable:
            found[mismatch.ident] = mismatch
        await self._observe_recorded(inflight, tracked)
        # 1. intents in flight: look each up; found -> its report, not found after the window -> rejected.
        resolved_order_ids: set[str] = set()
        resolved = 0
        for intent_id, raw in inflight.items():
            if intent_id in self._handed_out:
                continue  # this process handed the report out; the executor is recording it
            try:
                intent, sent_ms = parse_inflight(raw)
            except IntentError as exc:
                bad = Mismatch("unreadable_state", intent_id, {"key": KEY_INFLIGHT, "error": str(exc)},
                               intent_id=intent_id)
                found[bad.ident] = bad
                continue
            try:
                report = await self._resolve(intent, sent_ms, tracked.get(intent_id), None)
            except OrderOutcomeUnknownError:
                continue  # stays in flight and blocks (`_unresolved`)
            resolved += 1
            if report is not None and report.order_id:
                resolved_order_ids.add(report.order_id)
        # 2. orders open at the exchange that we do not know.
        open_orders = await self._call(self._rest.open_orders)
        open_by_id = {order.order_id: order for order in open_orders}
        known = resolved_order_ids | {order.order_id for order in tracked.values()}
        for exchange_order in open_orders:
            if exchange_order.order_id not in known:
                mismatch = Mismatch("unknown_open_order", exchange_order.order_id, _order_detail(exchange_order),
                                    market=exchange_order.market)
                found[mismatch.ident] = mismatch
        # 3. orders we follow that the exchange no longer has open: fetch their final state.
        updated = 0
        for intent_id, followed in tracked.items():
            if (intent_id in inflight or followed.order_id in open_by_id or followed.confirmed is None
                    or followed.confirmed.final):
                continue
            try:
                current = await self._call(self._rest.get_order, followed.intent.market, order_id=followed.order_id)
            except OrderNotFoundError:
                missing = Mismatch("tracked_order_missing", intent_id, {"order_id": followed.order_id},
                                   market=followed.intent.market, intent_id=intent_id)
                found[missing.ident] = missing
                continue
            change, state = advance(followed.intent, current, followed.confirmed)
            if change is not None:
                await self._hand_out(change, followed.intent, followed.sent_ms, replace(followed, pending=state), None)
                updated += 1
        # 4. balances: funds the exchange holds in orders must be the holds of the open orders we know.
        balances = await self._call(self._rest.balance)
        held: dict[str, Decimal] = {}
        for order_id in known & set(open_by_id):
            order = open_by_id[order_id]
            currency = order.extra.get("onHoldCurrency")
            if isinstance(currency, str):
                held[currency] = held.get(currency, ZERO) + order.decimals.get("onHold", ZERO)
        shown: dict[str, dict[str, str]] = {}
        for row in balances:
            symbol = str(row.get("symbol"))
            try:
                available = parse_decimal(row.get("available"), f"{symbol} available")
                in_order = parse_decimal(row.get("inOrder"), f"{symbol} inOrder")
            except DecimalParseError as exc:
                raise PayloadError(f"balance row {row!r}: {exc}") from None
            shown[symbol] = {"available": format_decimal(available), "in_order": format_decimal(in_order)}
            expected = held.pop(symbol, ZERO)
            if in_order != expected:
                mismatch = Mismatch("balance_in_order", symbol, {"symbol": symbol, "in_order": in_order,
                                                                 "held_by_our_orders": expected})
                found[mismatch.ident] = mismatch
        for symbol, expected in held.items():  # our orders hold funds the balance does not show
            mismatch = Mismatch("balance_in_order", symbol, {"symbol": symbol, "in_order": ZERO,
                                                             "held_by_our_orders": expected})
            found[mismatch.ident] = mismatch
        self.stats.last_balances = shown
        summary.update({"inflight_resolved": resolved, "open_orders": len(open_orders), "followed": len(tracked),
                        "closed_while_away": updated, "balances": shown})

    async def _publish(self, found: dict[str, Mismatch], summary: dict[str, Any], *, first: bool) -> None:
        """One critical event per NEW mismatch, one when all are resolved, and a summary at start."""
        new = [m for ident, m in found.items() if ident not in self._mismatches]
        cleared = sorted(ident for ident in self._mismatches if ident not in found)
        events: list[tuple[str, Severity, str | None, str | None, dict[str, Any]]] = [
            (EVENT_RECONCILE, Severity.CRITICAL, m.market, m.intent_id, {"kind": m.kind, **m.detail}) for m in new]
        if cleared and not found:
            events.append((EVENT_RECONCILE, Severity.INFO, None, None, {"kind": "resolved", "cleared": cleared}))
        if first:
            events.append((EVENT_RECONCILE, Severity.CRITICAL if found else Severity.INFO, None, None,
                           {"kind": "summary", "mismatches": sorted(found), **summary}))
        self._mismatches = found
        self.stats.mismatches_found += len(new)
        for mismatch in new:
            log.error("live venue: reconciliation mismatch %s: %s", mismatch.ident, mismatch.detail)
        if cleared and not found:
            log.warning("live venue: reconciliation mismatches resolved: %s", ", ".join(cleared))
        await self._emit(events)

    async def _add_mismatch(self, mismatch: Mismatch) -> None:
        if mismatch.ident not in self._mismatches:
            await self._publish({**self._mismatches, mismatch.ident: mismatch}, {}, first=False)

    async def _emit(self, events: Sequence[tuple[str, Severity, str | None, str | None, dict[str, Any]]]) -> None:
        if not events:
            return
        async with self._client.pipeline(transaction=True) as tx:
            for event_type, severity, market, intent_id, detail in events:
                queue_event(tx, event_type, severity, market=market, intent_id=intent_id, detail=detail)
            await tx.execute()

    @staticmethod
    async def _call(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """The REST client is blocking (requests + the governor's sleeps): run it off the event loop."""
        return await asyncio.to_thread(function, *args, **kwargs)


def _order_detail(order: Order) -> dict[str, Any]:
    detail: dict[str, Any] = {"order_id": order.order_id, "status": order.status, "side": order.side,
                              "order_type": order.order_type, "client_order_id": order.client_order_id,
                              "operator_id": order.operator_id}
    detail.update({name: value for name, value in order.decimals.items()
                   if name in ("amount", "amountRemaining", "price", "filledAmount")})
    return detail
