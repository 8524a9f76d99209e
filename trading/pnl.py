"""The PnL ledgers: fills in, positions and PnL out, by average cost and by FIFO side by side.

Pure (no I/O): `Ledger.apply(report)` books the NEW fills of one execution report, skipping any
`fill_id` it has booked before; `Ledger.mark(market, mid)` sets the price unrealised PnL and
exposure are valued at; `Ledger.snapshot(now_ms)` is the ledger's hash (decimals as strings).
`Ledgers` holds two of them, one per mode: paper fills (`dry_run`) and live fills are two books
that never share a position (`trading:pnl:paper`, `trading:pnl:live`).

Conventions (docs/pnl.md):
- Spot only: a position is a base amount >= 0. A sell larger than the position books only
  what was held (realising it to zero); the rest is an `Anomaly` (the account sold coins the
  bot never bought), recorded with the fill and never booked as a short. The fill's fee counts
  in full: it was paid. Every market is quoted in EUR (other quotes are refused: no EUR rate).
- Average cost: a buy moves the average entry price; a sell realises (price - average) x
  amount and keeps the average. FIFO: the position is a queue of lots; a sell closes the
  oldest lots first. Both realised figures are GROSS of fees.
- Fees are EUR: a fee in EUR counts as is; a fee in the base currency is base the account gives
  up, so it is booked as a disposal of that amount at the fill price (the position shrinks,
  realising against the cost basis like any sale) and its EUR value, fee x fill price, counts
  as a fee. A negative fee (maker rebate) lowers `fees`. Equity = realised - fees + unrealised.
- `realized_today` is realised - fees of the fills whose exchange time falls on the UTC day of
  the snapshot, so it restarts at 00:00 UTC.
- A mark is the mid of the latest top of book; until a market has one, its last fill price
  stands in and `<market>:mark_source` says `last_fill` instead of `mid`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal

from trading.decimals import ZERO, format_decimal
from trading.lake import utc_day
from trading.orders import ExecutionReport

QUOTE_CURRENCY = "EUR"
MARK_MID = "mid"
MARK_LAST_FILL = "last_fill"
PAPER = "paper"
LIVE = "live"
MODES = (PAPER, LIVE)


def mode_of(dry_run: bool) -> str:
    return PAPER if dry_run else LIVE


class LedgerError(ValueError):
    """A report the ledger cannot book (the message says why); nothing of it was booked."""


@dataclass(frozen=True)
class BookedFill:
    """One fill as the ledger books it: signed amount, EUR fee, base given up for a base-currency fee."""

    fill_id: str
    market: str
    ts: int
    amount: Decimal  # signed: + bought, - sold
    price: Decimal
    fee_eur: Decimal
    base_fee: Decimal  # base amount paid as fee (negative: a rebate received in base)


@dataclass(frozen=True)
class Anomaly:
    """Base the fill sold beyond the position: not booked (spot: the bot cannot be short)."""

    fill_id: str
    market: str
    ts: int
    unbooked: Decimal  # base amount sold that the ledger did not hold
    price: Decimal

    def to_json(self) -> dict[str, str | int]:
        return {"fill_id": self.fill_id, "market": self.market, "ts": self.ts,
                "unbooked": format_decimal(self.unbooked), "price": format_decimal(self.price)}


@dataclass(slots=True)
class Lot:
    amount: Decimal  # unsigned; the side is the sign of the market's position
    price: Decimal


@dataclass
class MarketAccount:
    """One market's long position under both methods. Invariant: sum of lot amounts == position >= 0."""

    position: Decimal = ZERO
    avg_cost: Decimal = ZERO  # average entry price of the open position; 0 when flat
    realized: Decimal = ZERO  # average cost, gross of fees
    realized_fifo: Decimal = ZERO
    fees: Decimal = ZERO  # EUR
    unbooked: Decimal = ZERO  # base sold beyond the position (anomalies), never booked
    lots: deque[Lot] = field(default_factory=deque)
    last_price: Decimal = ZERO  # of the latest fill: the stand-in mark

    def buy(self, amount: Decimal, price: Decimal) -> None:
        after = self.position + amount
        self.avg_cost = (self.position * self.avg_cost + amount * price) / after
        self.position = after
        self.lots.append(Lot(amount, price))

    def sell(self, amount: Decimal, price: Decimal) -> tuple[Decimal, Decimal]:
        """Sell up to the position; returns (average-cost PnL realised, base sold beyond the position)."""
        sold = min(amount, self.position)
        realized = sold * (price - self.avg_cost)
        self.realized += realized
        self.position -= sold
        if self.position == 0:
            self.avg_cost = ZERO
        remaining = sold
        while remaining:  # FIFO: close the oldest lots first
            lot = self.lots[0]
            closed = min(remaining, lot.amount)
            self.realized_fifo += closed * (price - lot.price)
            lot.amount -= closed
            remaining -= closed
            if lot.amount == 0:
                self.lots.popleft()
        excess = amount - sold
        self.unbooked += excess
        return realized, excess

    def unrealized(self, mark: Decimal) -> Decimal:
        return self.position * (mark - self.avg_cost)

    def unrealized_fifo(self, mark: Decimal) -> Decimal:
        return sum((lot.amount * (mark - lot.price) for lot in self.lots), ZERO)


@dataclass
class DayTotals:
    realized: Decimal = ZERO
    fees: Decimal = ZERO


@dataclass(frozen=True)
class ApplyOutcome:
    applied: int
    duplicates: int
    anomalies: tuple[Anomaly, ...] = ()


@dataclass
class Ledger:
    """Every market's account. Two ledgers are equal when they booked the same fills to the same
    numbers; marks and counters (which depend on when and how often reports arrived) are not compared."""

    accounts: dict[str, MarketAccount] = field(default_factory=dict)
    days: dict[str, DayTotals] = field(default_factory=dict)  # UTC day (YYYY-MM-DD) of the fill
    fill_ids: set[str] = field(default_factory=set)
    anomalies: list[Anomaly] = field(default_factory=list)
    marks: dict[str, Decimal] = field(default_factory=dict, compare=False)
    duplicates_skipped: int = field(default=0, compare=False)

    def apply(self, report: ExecutionReport) -> ApplyOutcome:
        """Book the report's fills not booked before; `LedgerError` (nothing booked) when one is invalid."""
        fills = booked_fills(report)
        applied = duplicates = 0
        anomalies: list[Anomaly] = []
        for fill in fills:
            if fill.fill_id in self.fill_ids:
                duplicates += 1
                continue
            if (anomaly := self._book(fill)) is not None:
                anomalies.append(anomaly)
            applied += 1
        self.duplicates_skipped += duplicates
        self.anomalies.extend(anomalies)
        return ApplyOutcome(applied, duplicates, tuple(anomalies))

    def _book(self, fill: BookedFill) -> Anomaly | None:
        self.fill_ids.add(fill.fill_id)
        account = self.accounts.setdefault(fill.market, MarketAccount())
        realized = excess = ZERO
        # A base-currency fee is a disposal of base (a rebate, an acquisition) at the fill price.
        for amount in (fill.amount, -fill.base_fee):
            if amount > 0:
                account.buy(amount, fill.price)
            elif amount < 0:
                gained, beyond = account.sell(-amount, fill.price)
                realized += gained
                excess += beyond
        account.fees += fill.fee_eur
        account.last_price = fill.price
        day = self.days.setdefault(utc_day(fill.ts).isoformat(), DayTotals())
        day.realized += realized
        day.fees += fill.fee_eur
        if excess:
            return Anomaly(fill.fill_id, fill.market, fill.ts, excess, fill.price)
        return None

    def mark(self, market: str, mid: Decimal) -> None:
        if not mid.is_finite() or mid <= 0:
            raise LedgerError(f"mark of {market} must be a positive price, got {mid}")
        self.marks[market] = mid

    @property
    def fills_applied(self) -> int:
        return len(self.fill_ids)

    def snapshot(self, now_ms: int) -> dict[str, str]:
        """The ledger's hash (`trading:pnl:<mode>`): totals, then `<market>:<field>` per market, decimals as text."""
        totals = dict.fromkeys(("realized", "realized_fifo", "fees", "unrealized", "unrealized_fifo", "exposure"),
                               ZERO)
        per_market: dict[str, str] = {}
        for market in sorted(self.accounts):
            account = self.accounts[market]
            mark = self.marks.get(market)
            source = MARK_MID if mark is not None else MARK_LAST_FILL
            if mark is None:
                mark = account.last_price
            values = {"position": account.position, "avg_cost": account.avg_cost, "realized": account.realized,
                      "realized_fifo": account.realized_fifo, "fees": account.fees,
                      "unrealized": account.unrealized(mark), "unrealized_fifo": account.unrealized_fifo(mark),
                      "exposure": account.position * mark, "mark": mark,
                      "unbooked": account.unbooked}
            for name in totals:
                totals[name] += values[name]
            per_market.update({f"{market}:{name}": format_decimal(value) for name, value in values.items()})
            per_market[f"{market}:mark_source"] = source
        day = utc_day(now_ms).isoformat()
        today = self.days.get(day, DayTotals())
        out = {name: format_decimal(value) for name, value in totals.items()}
        out.update(equity=format_decimal(totals["realized"] - totals["fees"] + totals["unrealized"]),
                   realized_today=format_decimal(today.realized - today.fees), day=day, updated_ts=str(now_ms),
                   fills=str(self.fills_applied), anomalies=str(len(self.anomalies)))
        out.update(per_market)
        return out


@dataclass
class Ledgers:
    """The paper ledger and the live ledger: each report is booked in the ledger of its mode."""

    paper: Ledger = field(default_factory=Ledger)
    live: Ledger = field(default_factory=Ledger)

    def of(self, dry_run: bool) -> Ledger:
        return self.paper if dry_run else self.live

    def by_mode(self) -> dict[str, Ledger]:
        return {PAPER: self.paper, LIVE: self.live}

    def apply(self, report: ExecutionReport) -> ApplyOutcome:
        return self.of(report.dry_run).apply(report)


def booked_fills(report: ExecutionReport) -> list[BookedFill]:
    """The report's fills checked and converted for booking; `LedgerError` on the first bad one."""
    base, _, quote = report.market.partition("-")
    if quote != QUOTE_CURRENCY or not base:
        raise LedgerError(f"market {report.market!r}: the ledger books EUR markets only (no EUR rate for {quote!r})")
    sign = 1 if report.side == "buy" else -1
    fills: list[BookedFill] = []
    for fill in report.fills:
        if not fill.fill_id:
            raise LedgerError("a fill without fill_id cannot be deduplicated")
        if fill.amount <= 0:
            raise LedgerError(f"fill {fill.fill_id}: amount must be positive, got {format_decimal(fill.amount)}")
        if fill.price <= 0:
            raise LedgerError(f"fill {fill.fill_id}: price must be positive, got {format_decimal(fill.price)}")
        fee_eur, base_fee = ZERO, ZERO
        if fill.fee_currency == QUOTE_CURRENCY:
            fee_eur = fill.fee
        elif fill.fee_currency == base:
            fee_eur, base_fee = fill.fee * fill.price, fill.fee
        elif fill.fee != 0:
            raise LedgerError(f"fill {fill.fill_id}: fee currency {fill.fee_currency!r} is neither {QUOTE_CURRENCY} "
                              f"nor {base}")
        fills.append(BookedFill(fill.fill_id, report.market, fill.ts, sign * fill.amount, fill.price, fee_eur,
                                base_fee))
    return fills
