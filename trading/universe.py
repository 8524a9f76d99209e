"""Universe selection: which markets ingest records and the trading core trades (`trading:universe`).

`select_universe(inputs, config, state, now_ms) -> Decision` is pure: scripted inputs in, the
decision with every market's reasons out. `run_selection` gathers the inputs (Redis streams and
the public REST API), calls it, and writes `trading:universe` and `universe:state` in one
transaction. docs/universe.md describes the filters, the hysteresis and the safety rules.

Filters, each recorded in the market's reasons with its measured value and whether it passed:
- hard, a member failing one leaves at once: `name` (BASE-EUR/USDC), `status` (listed in GET /markets
  and `trading`), `quote` (the configured quote currency), `blacklist` (regexes, full match);
- soft, under hysteresis: `ticker` (a 24 h row that is present, well-formed and fresh), `quote_volume`,
  `price`, `tick` (one tick as bps of the price), `range` (24 h high-low as bps of the low), `spread`,
  `volatility` (of log returns of closed candles), `depth` (EUR on the thinner side within `depth_bps`
  of the mid), and `rank` (top `top_n` by 24 h quote volume among the markets passing all the others).

Hysteresis: a market joins after qualifying for `min_qualify_s` (at once while the universe is
empty: there is no set to protect from churn), and only into a free slot, so additions never take
the universe past `top_n`; a member leaves after failing for `min_fail_s`. The universe is never emptied:
when nothing would remain, the previous members stay (an empty hash would send ingest back to its
unvetted default markets).
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import pairwise
from typing import Any

import orjson
import redis

from trading.bus import (
    BOOK_SCHEMA,
    CANDLE_SCHEMA,
    KEY_UNIVERSE,
    STREAM_BOOK,
    STREAM_TICKER24H,
    TICKER24H_SCHEMA,
    EntryDecodeError,
    Schema,
    as_text,
    decode_entry,
    stream_candles,
)
from trading.config import MARKET_PATTERN, ConfigError
from trading.decimals import DecimalParseError, format_decimal, parse_decimal
from trading.exchange.errors import BitvavoError
from trading.exchange.governor import RateBudgetExhaustedError
from trading.exchange.intervals import FIXED_INTERVAL_MS
from trading.exchange.models import Level, PayloadError, Ticker24h
from trading.exchange.rest import BitvavoRest

KEY_UNIVERSE_STATE = "universe:state"  # hash: market -> JSON {qualifying_since, failing_since}
BPS = Decimal(10_000)
_SHOWN = Decimal("0.01")
_SHOWN_SMALL = Decimal("1e-8")
_REST_ERRORS = (BitvavoError, PayloadError, RateBudgetExhaustedError)


# configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class UniverseConfig:
    top_n: int = 10
    min_quote_volume_eur: Decimal = Decimal("250000")
    max_spread_bps: Decimal = Decimal("30")
    min_volatility_bps: Decimal = Decimal("0")  # per candle of `candle_interval`
    max_volatility_bps: Decimal | None = None
    min_price: Decimal = Decimal("0")
    max_price: Decimal | None = None
    max_tick_bps: Decimal | None = None  # freqtrade's low_price_ratio: one tick as a share of the price
    min_range_bps: Decimal = Decimal("0")  # freqtrade's RangeStabilityFilter, on the 24 h high/low
    max_range_bps: Decimal | None = None
    min_depth_eur: Decimal = Decimal("0")  # 0 switches the depth filter (and its REST calls) off
    depth_bps: Decimal = Decimal("50")
    blacklist: tuple[str, ...] = ()
    quote: str = "EUR"
    min_qualify_s: int = 1800
    min_fail_s: int = 3600
    max_data_age_s: int = 300  # older ticker or book entries count as missing
    candle_interval: str = "5m"  # ingest records 5m candles, so members need no REST call
    volatility_candles: int = 48  # log returns in the window, so this many + 1 closed candles
    probe_limit: int | None = None  # markets probed for candles and depth; default 3 x top_n
    depth_levels: int = 200  # levels per side of the REST book used for the depth filter
    scan_limit: int = 20_000  # stream entries read back per stream at most

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name in ("top_n", "volatility_candles", "depth_levels", "scan_limit", "max_data_age_s"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("min_qualify_s", "min_fail_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)}: must be >= 0 (seconds)")
        if self.probe_limit is not None and self.probe_limit < self.top_n:
            problems.append(f"probe_limit={self.probe_limit}: must be >= top_n ({self.top_n}) or unset")
        if not 1 <= self.depth_levels <= 1000:
            problems.append(f"depth_levels={self.depth_levels}: Bitvavo allows 1..1000")
        for name in ("min_quote_volume_eur", "min_volatility_bps", "min_price", "min_range_bps", "min_depth_eur"):
            value = getattr(self, name)
            if not value.is_finite() or value < 0:
                problems.append(f"{name}={value}: must be a finite decimal >= 0")
        for name in ("max_spread_bps", "depth_bps", "max_volatility_bps", "max_price", "max_tick_bps",
                     "max_range_bps"):
            value = getattr(self, name)
            if value is not None and (not value.is_finite() or value <= 0):
                problems.append(f"{name}={value}: must be a finite decimal > 0" + ("" if name in (
                    "max_spread_bps", "depth_bps") else " or unset"))
        for low, high in (("min_volatility_bps", "max_volatility_bps"), ("min_price", "max_price"),
                          ("min_range_bps", "max_range_bps")):
            if getattr(self, high) is not None and getattr(self, low) > getattr(self, high):
                problems.append(f"{low}={getattr(self, low)} > {high}={getattr(self, high)}: the range is empty")
        if self.candle_interval not in FIXED_INTERVAL_MS:
            problems.append(f"candle_interval={self.candle_interval!r}: allowed {', '.join(FIXED_INTERVAL_MS)}")
        if not re.fullmatch(r"[A-Z0-9]{1,12}", self.quote):
            problems.append(f"quote={self.quote!r}: a currency code such as EUR")
        for pattern in self.blacklist:
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(f"blacklist pattern {pattern!r}: not a regular expression ({exc})")
        if problems:
            raise ConfigError(problems)

    @property
    def probe_count(self) -> int:
        return self.probe_limit if self.probe_limit is not None else 3 * self.top_n

    @property
    def volatility_enabled(self) -> bool:
        return self.min_volatility_bps > 0 or self.max_volatility_bps is not None

    @property
    def depth_enabled(self) -> bool:
        return self.min_depth_eur > 0

    @property
    def range_enabled(self) -> bool:
        return self.min_range_bps > 0 or self.max_range_bps is not None


# inputs and state ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    """A GET /markets row, as far as selection needs it."""

    status: str
    quote: str
    tick_size: Decimal | None = None


@dataclass(frozen=True)
class TickerData:
    """A 24 h ticker row; price fields are None for markets without trades."""

    received_ms: int
    source: str  # "stream" | "rest"
    last: Decimal | None = None
    volume_quote: Decimal | None = None
    high: Decimal | None = None
    low: Decimal | None = None
    bid: Decimal | None = None
    ask: Decimal | None = None


@dataclass(frozen=True)
class TopOfBook:
    received_ms: int
    bid: Decimal | None
    ask: Decimal | None


@dataclass(frozen=True)
class BookLevels:
    bids: Sequence[Level]
    asks: Sequence[Level]


@dataclass(frozen=True)
class MarketInputs:
    """What was measured about one market. `errors` says why a part could not be read (by part:
    "ticker", "book", "candles"); a part that is None without an error was not gathered."""

    listing: Listing | None = None
    ticker: TickerData | None = None
    top: TopOfBook | None = None
    closes: Sequence[Decimal] | None = None  # closed candles, oldest first
    closes_source: str = "stream"
    levels: BookLevels | None = None
    errors: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MarketTimer:
    qualifying_since: int | None = None
    failing_since: int | None = None


@dataclass(frozen=True)
class UniverseState:
    members: Mapping[str, int | None] = field(default_factory=dict)  # market -> member since (ms), if known
    timers: Mapping[str, MarketTimer] = field(default_factory=dict)


# decision ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    hard: bool = False
    kind: str = ""  # what went wrong, when it is not the threshold itself ("missing", "stale", ...)

    @property
    def code(self) -> str:
        """The reject reason this check counts under."""
        return f"{self.name}:{self.kind}" if self.kind else self.name

    def __str__(self) -> str:
        return f"{self.name} {'ok' if self.ok else 'FAIL'}: {self.detail}"


@dataclass(frozen=True)
class MarketDecision:
    market: str
    action: str  # "add" | "keep" | "remove" | "wait" | "reject"
    note: str
    checks: tuple[Check, ...]
    score: Decimal | None = None
    rank: int | None = None
    since: int | None = None  # member since (ms), for members after this decision

    @property
    def member(self) -> bool:
        return self.action in ("add", "keep")

    @property
    def reasons(self) -> list[str]:
        return [self.note, *map(str, self.checks)]

    def universe_value(self, decided_at: int) -> str:
        """The `trading:universe` hash value: JSON {score, rank, since, reasons, decided_at}."""
        return orjson.dumps({"score": None if self.score is None else format_decimal(self.score),
                             "rank": self.rank, "since": self.since, "reasons": self.reasons,
                             "decided_at": decided_at}).decode()


@dataclass(frozen=True)
class Decision:
    now_ms: int
    markets: Mapping[str, MarketDecision]
    timers: Mapping[str, MarketTimer]
    rejects: Mapping[str, int]
    kept_previous: bool = False  # nothing would remain, so the previous members stayed

    @property
    def universe(self) -> tuple[str, ...]:
        return tuple(sorted(m for m, d in self.markets.items() if d.member))

    def with_action(self, action: str) -> tuple[str, ...]:
        return tuple(sorted(m for m, d in self.markets.items() if d.action == action))

    def table_rows(self) -> list[dict[str, str]]:
        """One row per market for the run's table artifact: members by rank, then the rest."""
        order = {"add": 0, "keep": 0, "remove": 1, "wait": 2, "reject": 3}
        rows = sorted(self.markets.values(),
                      key=lambda d: (order[d.action], d.rank if d.rank is not None else 10**9, d.market))
        return [{"market": d.market, "decision": d.action, "member": "yes" if d.member else "no",
                 "rank": "" if d.rank is None else str(d.rank),
                 "score": "" if d.score is None else format_decimal(d.score),
                 "reasons": "; ".join(d.reasons)} for d in rows]


# measurements -----------------------------------------------------------------------------------


def _shown(value: Decimal, *, price: bool = False) -> str:
    """A measured value for a reason: 2 decimals (8 for prices below 1, small coins), never an exponent."""
    if abs(value) >= Decimal("1e15"):
        return format_decimal(value)
    return format_decimal(value.quantize(_SHOWN_SMALL if price and abs(value) < 1 else _SHOWN))


def log_return_volatility_bps(closes: Sequence[Decimal]) -> Decimal:
    """Sample standard deviation of the log returns between consecutive closes, in bps.

    A statistic, not money: it is computed in float (math.log needs one, and 1e-15 relative error
    is far below any threshold), then handed on as a Decimal rounded to 0.0001 bps, so every
    number the universe stores or emits is a Decimal string.
    """
    if len(closes) < 3 or any(c <= 0 for c in closes):
        raise ValueError("needs at least 3 positive closes")
    returns = [math.log(float(after / before)) for before, after in pairwise(closes)]
    return Decimal(f"{statistics.stdev(returns) * 10_000:.4f}")


@dataclass(frozen=True)
class Depth:
    mid: Decimal
    bid_eur: Decimal
    ask_eur: Decimal

    @property
    def thinner_eur(self) -> Decimal:
        return min(self.bid_eur, self.ask_eur)


def depth_within(levels: BookLevels, band_bps: Decimal) -> Depth:
    """Quote value resting within `band_bps` of the mid on each side (the levels fetched, so a lower bound)."""
    if not levels.bids or not levels.asks:
        raise ValueError("one side of the book is empty")
    best_bid, best_ask = max(p for p, _ in levels.bids), min(p for p, _ in levels.asks)
    if best_bid >= best_ask:
        raise ValueError(f"crossed book: bid {best_bid} >= ask {best_ask}")
    mid = (best_bid + best_ask) / 2
    low, high = mid * (1 - band_bps / BPS), mid * (1 + band_bps / BPS)
    return Depth(mid, sum((p * s for p, s in levels.bids if p >= low), Decimal(0)),
                 sum((p * s for p, s in levels.asks if p <= high), Decimal(0)))


# evaluation -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    market: str
    checks: tuple[Check, ...]
    score: Decimal | None = None

    @property
    def passes(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def hard_failure(self) -> Check | None:
        return next((c for c in self.checks if c.hard and not c.ok), None)


def _hard_checks(market: str, data: MarketInputs | None, config: UniverseConfig) -> list[Check]:
    if not MARKET_PATTERN.match(market):
        return [Check("name", False, f"{market!r} is not BASE-EUR or BASE-USDC in upper case", hard=True)]
    listing = data.listing if data else None
    if listing is None:
        return [Check("status", False, "not listed in GET /markets", hard=True, kind="unlisted")]
    checks = [Check("status", listing.status == "trading", f"status {listing.status} (only trading)", hard=True)]
    checks.append(Check("quote", listing.quote == config.quote, f"quote {listing.quote} (wanted {config.quote})",
                        hard=True))
    matched = next((p for p in config.blacklist if re.fullmatch(p, market)), None)
    checks.append(Check("blacklist", matched is None,
                        "no pattern matches" if matched is None else f"matches {matched!r}", hard=True))
    return checks


def _ticker_check(data: MarketInputs, config: UniverseConfig, now_ms: int) -> Check:
    if "ticker" in data.errors:
        return Check("ticker", False, f"malformed: {data.errors['ticker']}", kind="malformed")
    ticker = data.ticker
    if ticker is None:
        return Check("ticker", False, "no ticker24h row in the stream or from REST", kind="missing")
    age_s = (now_ms - ticker.received_ms) / 1000
    if age_s > config.max_data_age_s:
        return Check("ticker", False, f"{ticker.source} row is {age_s:.0f}s old > max_data_age_s "
                     f"{config.max_data_age_s}", kind="stale")
    problems = [name for name, value in (("volumeQuote", ticker.volume_quote), ("last", ticker.last))
                if value is None or value < 0]
    problems += [name for name, value in (("high", ticker.high), ("low", ticker.low), ("bid", ticker.bid),
                                          ("ask", ticker.ask)) if value is not None and value < 0]
    if problems:
        return Check("ticker", False, f"missing or negative {', '.join(problems)}", kind="invalid")
    return Check("ticker", True, f"{ticker.source} row, {max(age_s, 0):.0f}s old")


def _spread_check(data: MarketInputs, ticker: TickerData, config: UniverseConfig, now_ms: int) -> Check:
    top = data.top
    fresh_top = top is not None and now_ms - top.received_ms <= config.max_data_age_s * 1000
    if fresh_top and top is not None and top.received_ms >= ticker.received_ms:
        bid, ask, source = top.bid, top.ask, "book"
    else:
        bid, ask, source = ticker.bid, ticker.ask, f"ticker {ticker.source}"
    if bid is None or ask is None or bid <= 0 or ask <= bid:
        return Check("spread", False, f"no usable bid/ask ({source}: bid {bid}, ask {ask})", kind="missing")
    spread = (ask - bid) / ((ask + bid) / 2) * BPS
    return Check("spread", spread <= config.max_spread_bps,
                 f"spread_bps {_shown(spread)} <= {format_decimal(config.max_spread_bps)} ({source})"
                 if spread <= config.max_spread_bps else
                 f"spread_bps {_shown(spread)} > {format_decimal(config.max_spread_bps)} ({source})")


def _bounded(name: str, label: str, value: Decimal, low: Decimal, high: Decimal | None, *,
             price: bool = False) -> Check:
    shown = _shown(value, price=price)
    if value < low:
        return Check(name, False, f"{label} {shown} < {format_decimal(low)}")
    if high is not None and value > high:
        return Check(name, False, f"{label} {shown} > {format_decimal(high)}")
    bounds = [f">= {format_decimal(low)}"] if low > 0 or high is None else []
    bounds += [] if high is None else [f"<= {format_decimal(high)}"]
    return Check(name, True, f"{label} {shown} {' and '.join(bounds)}")


def _ticker_checks(data: MarketInputs, ticker: TickerData, config: UniverseConfig, now_ms: int) -> list[Check]:
    assert ticker.volume_quote is not None and ticker.last is not None  # _ticker_check passed
    checks = [_bounded("quote_volume", "volumeQuote", ticker.volume_quote, config.min_quote_volume_eur, None),
              _bounded("price", "last", ticker.last, config.min_price, config.max_price, price=True)]
    if config.max_tick_bps is not None:
        tick = data.listing.tick_size if data.listing else None
        if tick is None or ticker.last <= 0:
            checks.append(Check("tick", False, "no tickSize or no last price", kind="missing"))
        else:
            tick_bps = tick / ticker.last * BPS
            checks.append(_bounded("tick", "tick_bps", tick_bps, Decimal(0), config.max_tick_bps))
    if config.range_enabled:
        if ticker.high is None or ticker.low is None or ticker.low <= 0 or ticker.high < ticker.low:
            checks.append(Check("range", False, f"no usable 24 h high/low ({ticker.high}/{ticker.low})",
                                kind="missing"))
        else:
            range_bps = (ticker.high - ticker.low) / ticker.low * BPS
            checks.append(_bounded("range", "range_bps", range_bps, config.min_range_bps, config.max_range_bps))
    checks.append(_spread_check(data, ticker, config, now_ms))
    return checks


def _volatility_check(data: MarketInputs, config: UniverseConfig) -> Check:
    if "candles" in data.errors:
        return Check("volatility", False, f"candles unreadable: {data.errors['candles']}", kind="data")
    if data.closes is None:
        return Check("volatility", False, "not measured: not among the markets probed", kind="not_probed")
    needed = config.volatility_candles + 1
    if len(data.closes) < needed:
        return Check("volatility", False, f"{len(data.closes)} closed {config.candle_interval} candles "
                     f"({data.closes_source}), need {needed}", kind="data")
    try:
        volatility = log_return_volatility_bps(data.closes[-needed:])
    except ValueError as exc:
        return Check("volatility", False, str(exc), kind="data")
    check = _bounded("volatility", "volatility_bps", volatility, config.min_volatility_bps,
                     config.max_volatility_bps)
    return Check(check.name, check.ok, f"{check.detail} over {config.volatility_candles} "
                 f"{config.candle_interval} returns ({data.closes_source})")


def _depth_check(data: MarketInputs, config: UniverseConfig) -> Check:
    if "book" in data.errors:
        return Check("depth", False, f"book unreadable: {data.errors['book']}", kind="data")
    if data.levels is None:
        return Check("depth", False, "not measured: not among the markets probed", kind="not_probed")
    try:
        depth = depth_within(data.levels, config.depth_bps)
    except ValueError as exc:
        return Check("depth", False, str(exc), kind="data")
    detail = (f"thinner side {_shown(depth.thinner_eur)} EUR within {format_decimal(config.depth_bps)} bps "
              f"(bids {_shown(depth.bid_eur)}, asks {_shown(depth.ask_eur)})")
    ok = depth.thinner_eur >= config.min_depth_eur
    return Check("depth", ok, f"{detail} {'>=' if ok else '<'} {format_decimal(config.min_depth_eur)}")


def evaluate_market(market: str, data: MarketInputs | None, config: UniverseConfig, now_ms: int, *,
                    cheap_only: bool = False) -> Evaluation:
    """Every filter's check for one market (no rank yet). `cheap_only` leaves out candles and depth,
    which need REST calls: the probe list is chosen from the cheap checks."""
    checks = _hard_checks(market, data, config)
    if data is None or not all(c.ok for c in checks):
        return Evaluation(market, tuple(checks))
    ticker_check = _ticker_check(data, config, now_ms)
    checks.append(ticker_check)
    if not ticker_check.ok or data.ticker is None:
        return Evaluation(market, tuple(checks))
    checks += _ticker_checks(data, data.ticker, config, now_ms)
    if not cheap_only:
        if config.volatility_enabled:
            checks.append(_volatility_check(data, config))
        if config.depth_enabled:
            checks.append(_depth_check(data, config))
    return Evaluation(market, tuple(checks), data.ticker.volume_quote)


def _by_score(evaluations: Iterable[Evaluation]) -> list[Evaluation]:
    return sorted((e for e in evaluations if e.passes and e.score is not None),
                  key=lambda e: (-(e.score or 0), e.market))


def markets_to_probe(inputs: Mapping[str, MarketInputs], config: UniverseConfig, members: Collection[str],
                     now_ms: int) -> tuple[str, ...]:
    """Markets worth the REST calls for candles and depth: the best `probe_count` by quote volume
    among those passing the cheap filters, plus every member passing them."""
    ranked = _by_score(evaluate_market(m, d, config, now_ms, cheap_only=True) for m, d in inputs.items())
    best = [e.market for e in ranked[:config.probe_count]]
    extra = [e.market for e in ranked[config.probe_count:] if e.market in members]
    return tuple(best + extra)


# selection --------------------------------------------------------------------------------------


def _seconds(ms: int) -> str:
    return f"{ms / 1000:.0f}s"


def _or_now(ms: int | None, now_ms: int) -> int:
    return now_ms if ms is None else ms


def select_universe(inputs: Mapping[str, MarketInputs], config: UniverseConfig, state: UniverseState,
                    now_ms: int) -> Decision:
    """The universe after this run, each market's action and reasons, and the new hysteresis timers."""
    markets = sorted(set(inputs) | set(state.members))
    evaluations = {m: evaluate_market(m, inputs.get(m), config, now_ms) for m in markets}
    ranked = _by_score(evaluations.values())
    rank_of = {e.market: i for i, e in enumerate(ranked, 1)}
    checks: dict[str, tuple[Check, ...]] = {}
    qualifies: dict[str, bool] = {}
    for market, evaluation in evaluations.items():
        rank = rank_of.get(market)
        extra: tuple[Check, ...] = ()
        if rank is not None:
            extra = (Check("rank", rank <= config.top_n, f"{rank} of {len(ranked)} passing, by quote volume "
                           f"({'<=' if rank <= config.top_n else '>'} top_n {config.top_n})"),)
        checks[market] = evaluation.checks + extra
        qualifies[market] = rank is not None and rank <= config.top_n

    timers: dict[str, MarketTimer] = {}
    for market in markets:
        old = state.timers.get(market, MarketTimer())
        timers[market] = (MarketTimer(qualifying_since=_or_now(old.qualifying_since, now_ms)) if qualifies[market]
                          else MarketTimer(failing_since=_or_now(old.failing_since, now_ms)))

    def decided(market: str, action: str, note: str, since: int | None = None) -> MarketDecision:
        return MarketDecision(market, action, note, checks[market], evaluations[market].score,
                              rank_of.get(market), since)

    result: dict[str, MarketDecision] = {}
    for market, known_since in state.members.items():
        since = _or_now(known_since, now_ms)
        hard = evaluations[market].hard_failure
        failing_ms = now_ms - _or_now(timers[market].failing_since, now_ms)
        if qualifies[market]:
            result[market] = decided(market, "keep", "member: qualifies", since)
        elif hard is not None:
            result[market] = decided(market, "remove", f"removed at once: hard filter {hard.name} failed")
        elif failing_ms >= config.min_fail_s * 1000:
            result[market] = decided(market, "remove", f"removed: failing for {_seconds(failing_ms)} "
                                     f">= min_fail_s {config.min_fail_s}")
        else:
            result[market] = decided(market, "keep", f"member kept by hysteresis: failing for "
                                     f"{_seconds(failing_ms)} < min_fail_s {config.min_fail_s}", since)

    bootstrap = not state.members
    taken = sum(1 for d in result.values() if d.member)
    free = config.top_n - taken
    for evaluation in ranked:
        market = evaluation.market
        if market in result or not qualifies[market]:
            continue
        held_ms = now_ms - _or_now(timers[market].qualifying_since, now_ms)
        if not bootstrap and held_ms < config.min_qualify_s * 1000:
            result[market] = decided(market, "wait", f"qualifying for {_seconds(held_ms)} < min_qualify_s "
                                     f"{config.min_qualify_s}")
        elif free <= 0:
            result[market] = decided(market, "wait", f"qualifies, but no free slot ({taken} members, top_n "
                                     f"{config.top_n})")
        else:
            free -= 1
            how = "the universe was empty" if bootstrap else f"qualifying for {_seconds(held_ms)}"
            result[market] = decided(market, "add", f"added: {how}", now_ms)
    for market in markets:
        if market not in result:
            failed = [c.code for c in checks[market] if not c.ok]
            result[market] = decided(market, "reject", f"not selected: {', '.join(failed)}")

    kept_previous = bool(state.members) and not any(d.member for d in result.values())
    if kept_previous:
        for market, known_since in state.members.items():
            result[market] = decided(market, "keep", "kept: nothing else would remain, and the universe is "
                                     "never emptied", _or_now(known_since, now_ms))

    members_after = {m for m, d in result.items() if d.member}
    kept_timers = {m: t for m, t in timers.items() if m in members_after or qualifies[m]}
    rejects = Counter(c.code for market in markets for c in checks[market] if not c.ok)
    return Decision(now_ms, dict(sorted(result.items())), kept_timers, dict(sorted(rejects.items())),
                    kept_previous)


# Redis: state ------------------------------------------------------------------------------------



def _optional_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def load_state(client: redis.Redis | redis.client.Pipeline) -> UniverseState:
    """Members from `trading:universe` (what ingest sees) and timers from `universe:state`.

    A value that does not parse costs only what it held (the member's `since`, a timer): the
    member itself still counts, so a hand-edited hash never makes a market vanish unexplained.
    """
    universe = client.hgetall(KEY_UNIVERSE)
    stored = client.hgetall(KEY_UNIVERSE_STATE)
    assert isinstance(universe, dict) and isinstance(stored, dict)
    members = {as_text(m): _optional_int(_json_object(as_text(v)).get("since")) for m, v in universe.items()}
    timers = {}
    for market, value in stored.items():
        fields = _json_object(as_text(value))
        timers[as_text(market)] = MarketTimer(_optional_int(fields.get("qualifying_since")),
                                            _optional_int(fields.get("failing_since")))
    return UniverseState(members, timers)


def queue_write(pipe: redis.client.Pipeline, decision: Decision) -> None:
    """Replace both hashes inside the caller's MULTI, so readers see the old or the new universe, never a mix."""
    pipe.delete(KEY_UNIVERSE, KEY_UNIVERSE_STATE)
    if decision.universe:
        pipe.hset(KEY_UNIVERSE, mapping={m: decision.markets[m].universe_value(decision.now_ms)
                                         for m in decision.universe})
    if decision.timers:
        pipe.hset(KEY_UNIVERSE_STATE, mapping={
            m: orjson.dumps({"qualifying_since": t.qualifying_since, "failing_since": t.failing_since}).decode()
            for m, t in decision.timers.items()})


class UniverseConflictError(RuntimeError):
    """Another writer changed the universe while this run was deciding; nothing was written."""


# Redis and REST: inputs -------------------------------------------------------------------------


@dataclass
class GatherStats:
    stream_entries_read: int = 0
    malformed_stream_entries: int = 0
    malformed_rest_rows: int = 0
    rest_calls: int = 0
    rest_errors: int = 0
    tickers_from_stream: int = 0
    tickers_from_rest: int = 0
    probed: int = 0


def read_latest(client: redis.Redis, stream: str, schema: Schema, *, since_ms: int,
                markets: Collection[str] | None, scan_limit: int, stats: GatherStats,
                page: int = 1000) -> dict[str, dict[str, Any] | str]:
    """The newest entry per market among entries added since `since_ms` (decoded, or the decode error).

    The newest entry is authoritative: when it is malformed the market gets the error, not an
    older entry, so bad data surfaces as a reject reason instead of hiding behind stale data.
    """
    found: dict[str, dict[str, Any] | str] = {}
    upper = "+"
    scanned = 0
    while scanned < scan_limit:
        entries = client.xrevrange(stream, max=upper, min=f"{since_ms}-0", count=min(page, scan_limit - scanned))
        assert isinstance(entries, list)
        for _entry_id, raw in entries:
            raw = raw or {}
            market = as_text(raw.get("market", ""))
            if market in found or (markets is not None and market not in markets):
                continue
            try:
                found[market] = decode_entry(raw, schema)
            except EntryDecodeError as exc:
                stats.malformed_stream_entries += 1
                found[market] = str(exc)
        scanned += len(entries)
        if len(entries) < page or (markets is not None and len(found) >= len(markets)):
            break
        upper = "(" + as_text(entries[-1][0])
    stats.stream_entries_read += scanned
    return found


def read_closes(client: redis.Redis, config: UniverseConfig, markets: Collection[str], now_ms: int,
                stats: GatherStats, page: int = 1000) -> dict[str, list[Decimal] | str]:
    """Closes of the closed candles in the volatility window per market, oldest first, from the
    candle stream (newest entry per bucket wins: Bitvavo re-sends a bucket after every trade)."""
    interval_ms = FIXED_INTERVAL_MS[config.candle_interval]
    current_bucket = now_ms - now_ms % interval_ms
    first_bucket = current_bucket - (config.volatility_candles + 1) * interval_ms
    seen: dict[str, dict[int, Decimal]] = {m: {} for m in markets}
    errors: dict[str, str] = {}
    upper, scanned = "+", 0
    # Entries are added when received, which may be well after their bucket: scan back from the
    # window start, with the scan limit as the bound.
    while scanned < config.scan_limit:
        entries = client.xrevrange(stream_candles(config.candle_interval), max=upper, min=f"{first_bucket}-0",
                                   count=min(page, config.scan_limit - scanned))
        assert isinstance(entries, list)
        for _entry_id, raw in entries:
            raw = raw or {}
            market = as_text(raw.get("market", ""))
            if market not in seen or market in errors:
                continue
            try:
                fields = decode_entry(raw, CANDLE_SCHEMA)
                open_ts, close = int(fields["open_ts"]), fields["close"]
            except (EntryDecodeError, KeyError) as exc:
                stats.malformed_stream_entries += 1
                errors[market] = f"malformed candle entry: {exc}"
                continue
            if first_bucket <= open_ts < current_bucket:
                seen[market].setdefault(open_ts, close)
        scanned += len(entries)
        if len(entries) < page:
            break
        upper = "(" + as_text(entries[-1][0])
    stats.stream_entries_read += scanned
    out: dict[str, list[Decimal] | str] = dict(errors)
    for market, buckets in seen.items():
        if market not in out:
            out[market] = [buckets[ts] for ts in sorted(buckets)]
    return out


def fetch_listings(rest: BitvavoRest, stats: GatherStats) -> dict[str, Listing]:
    """GET /markets. Its failure fails the run: without statuses no market can be vetted."""
    stats.rest_calls += 1
    rows = rest.markets()
    if not isinstance(rows, list):
        raise PayloadError(f"GET /markets returned {type(rows).__name__}, not a list")
    listings: dict[str, Listing] = {}
    for row in rows:
        try:
            market, status, quote = row["market"], row["status"], row["quote"]
            if not all(isinstance(v, str) for v in (market, status, quote)):
                raise TypeError("market, status and quote must be strings")
            tick = row.get("tickSize")
            listings[market] = Listing(status, quote, None if tick is None else parse_decimal(tick, "tickSize"))
        except (KeyError, TypeError, DecimalParseError):
            stats.malformed_rest_rows += 1
    return listings


def _ticker_from_fields(fields: Mapping[str, Any], received_ms: int, source: str) -> TickerData:
    return TickerData(received_ms, source, last=fields.get("last"), volume_quote=fields.get("volumeQuote"),
                      high=fields.get("high"), low=fields.get("low"), bid=fields.get("bid"), ask=fields.get("ask"))


def _rest_tickers(rest: BitvavoRest, wanted: Collection[str], now_ms: int,
                  stats: GatherStats) -> dict[str, TickerData | str]:
    """One GET /ticker/24h for all markets (weight 25), for the markets the stream does not carry."""
    stats.rest_calls += 1
    try:
        rows = rest.ticker24h()
        if not isinstance(rows, list):
            raise PayloadError(f"a {type(rows).__name__}, not a list of rows")
    except _REST_ERRORS as exc:
        stats.rest_errors += 1
        return {m: f"GET /ticker/24h failed: {exc}" for m in wanted}
    out: dict[str, TickerData | str] = {}
    for row in rows:
        market = row.get("market") if isinstance(row, dict) else None
        if market not in wanted:
            continue
        try:
            ticker = Ticker24h.from_wire(row)
        except PayloadError as exc:
            stats.malformed_rest_rows += 1
            out[str(market)] = str(exc)
            continue
        out[ticker.market] = _ticker_from_fields(ticker.values, now_ms, "rest")
    return out


def _rest_closes(rest: BitvavoRest, market: str, config: UniverseConfig, now_ms: int) -> list[Decimal]:
    interval_ms = FIXED_INTERVAL_MS[config.candle_interval]
    current_bucket = now_ms - now_ms % interval_ms
    candles = rest.candles(market, config.candle_interval, limit=config.volatility_candles + 1,
                           end_ms=current_bucket)  # end is exclusive: the open bucket is left out
    return [c.close for c in sorted(candles, key=lambda c: c.open_ts)]


@dataclass
class _Parts:
    listing: Listing | None = None
    ticker: TickerData | None = None
    top: TopOfBook | None = None
    closes: list[Decimal] | None = None
    closes_source: str = "stream"
    levels: BookLevels | None = None
    errors: dict[str, str] = field(default_factory=dict)

    def freeze(self) -> MarketInputs:
        return MarketInputs(self.listing, self.ticker, self.top, self.closes, self.closes_source, self.levels,
                            self.errors)


def gather_inputs(client: redis.Redis, rest: BitvavoRest, config: UniverseConfig, members: Collection[str],
                  now_ms: int) -> tuple[dict[str, MarketInputs], GatherStats]:
    """Listings, tickers (stream, else REST), tops of book (stream), and for the probed markets
    closes (stream, else REST) and book levels (REST). A per-market failure becomes that market's
    error; only GET /markets failing fails the whole gathering."""
    stats = GatherStats()
    listings = fetch_listings(rest, stats)
    parts = {m: _Parts(listing=listing) for m, listing in listings.items() if listing.quote == config.quote}
    for market in members:
        parts.setdefault(market, _Parts(listing=listings.get(market)))
    since_ms = now_ms - config.max_data_age_s * 1000

    for market, entry in read_latest(client, STREAM_TICKER24H, TICKER24H_SCHEMA, since_ms=since_ms,
                                     markets=parts, scan_limit=config.scan_limit, stats=stats).items():
        if isinstance(entry, str):
            parts[market].errors["ticker"] = entry
        else:
            parts[market].ticker = _ticker_from_fields(entry, int(entry.get("recv_ts", entry["ts"])), "stream")
            stats.tickers_from_stream += 1
    lacking = [m for m, p in parts.items() if p.ticker is None and "ticker" not in p.errors]
    if lacking:
        for market, ticker in _rest_tickers(rest, lacking, now_ms, stats).items():
            if isinstance(ticker, str):
                parts[market].errors["ticker"] = ticker
            else:
                parts[market].ticker = ticker
                stats.tickers_from_rest += 1

    for market, entry in read_latest(client, STREAM_BOOK, BOOK_SCHEMA, since_ms=since_ms, markets=parts,
                                     scan_limit=config.scan_limit, stats=stats).items():
        if not isinstance(entry, str):  # a bad top only costs the fallback to the ticker's bid/ask
            parts[market].top = TopOfBook(int(entry.get("recv_ts", entry["ts"])), entry.get("bid"), entry.get("ask"))

    probes = markets_to_probe({m: p.freeze() for m, p in parts.items()}, config, members, now_ms)
    stats.probed = len(probes)
    if config.volatility_enabled:
        needed = config.volatility_candles + 1
        for market, closes in read_closes(client, config, probes, now_ms, stats).items():
            if isinstance(closes, str):
                parts[market].errors["candles"] = closes
            elif len(closes) >= needed:
                parts[market].closes = closes
            else:  # the stream lacks part of the window (market not recorded, gaps): ask REST
                stats.rest_calls += 1
                try:
                    parts[market].closes, parts[market].closes_source = (
                        _rest_closes(rest, market, config, now_ms), "rest")
                except _REST_ERRORS as exc:
                    stats.rest_errors += 1
                    parts[market].errors["candles"] = f"GET candles failed: {exc}"
    if config.depth_enabled:
        for market in probes:
            stats.rest_calls += 1
            try:
                snapshot = rest.book(market, config.depth_levels)
            except _REST_ERRORS as exc:
                stats.rest_errors += 1
                parts[market].errors["book"] = f"GET book failed: {exc}"
                continue
            parts[market].levels = BookLevels(snapshot.bids, snapshot.asks)
    return {m: p.freeze() for m, p in parts.items()}, stats


# one run ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectionOutcome:
    decision: Decision
    stats: GatherStats

    def summary(self) -> dict[str, Any]:
        d = self.decision
        return {"universe": list(d.universe), "added": list(d.with_action("add")),
                "removed": list(d.with_action("remove")), "waiting": list(d.with_action("wait")),
                "evaluated": len(d.markets), "rejects": dict(d.rejects), "kept_previous": d.kept_previous,
                "decided_at": d.now_ms, **{f"gather_{k}": v for k, v in vars(self.stats).items()}}


def run_selection(client: redis.Redis, rest: BitvavoRest, config: UniverseConfig, *, now_ms: int) -> SelectionOutcome:
    """Read state, gather, decide, write. WATCH on both hashes makes the write conditional: if any
    other writer touched them meanwhile, nothing is written and `UniverseConflictError` is raised."""
    with client.pipeline(transaction=True) as pipe:
        pipe.watch(KEY_UNIVERSE, KEY_UNIVERSE_STATE)  # type: ignore[no-untyped-call]
        state = load_state(pipe)
        inputs, stats = gather_inputs(client, rest, config, tuple(state.members), now_ms)
        decision = select_universe(inputs, config, state, now_ms)
        pipe.multi()
        queue_write(pipe, decision)
        try:
            pipe.execute()
        except redis.WatchError:
            raise UniverseConflictError(f"{KEY_UNIVERSE} or {KEY_UNIVERSE_STATE} changed during the run; "
                                        "nothing written (is a second selector running?)") from None
    return SelectionOutcome(decision, stats)
