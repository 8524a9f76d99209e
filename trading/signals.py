"""Signals from the top of book: rolling spread and volatility per market, and pluggable strategies.

Pure logic, no Redis (the loop is `trading/signal_engine.py`; the guide is docs/signal-engine.md):

- `parse_book_entry` checks one `bitvavo:book` entry and raises `BadBookEntry` (with a metric
  `kind`) for anything off-contract: a missing field, a value that is not a decimal, a price or
  size that is not positive, a crossed book, an unknown market.
- `MarketWindow` keeps the last `window` samples (exchange ts, mid, spread in bps) of a market,
  the last nonce seen (idempotency) and the time of the last signal (throttling). It serialises
  to JSON so the loop can persist it in the transaction that acknowledges the entry.
- A strategy is any callable `(MarketState, SignalParams) -> SignalDecision | None`. `baseline`
  is the default; `load_strategy` takes a name from `STRATEGIES` or a dotted path
  `package.module:function`, so a user adds a strategy without touching the loop.
- `SignalEvaluator` ties them together: one entry in, one `Evaluation` out (the signal to emit,
  if any, and why not otherwise), with `restore()` to undo an evaluation whose effects were
  not committed.
"""

from __future__ import annotations

import importlib
import math
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from enum import StrEnum
from itertools import pairwise
from typing import Any, Literal, Protocol

import orjson

from trading.bus import BOOK_SCHEMA, EntryDecodeError, decode_entry
from trading.config import MARKET_PATTERN, Settings
from trading.decimals import DecimalParseError, format_decimal, parse_decimal

Side = Literal["buy", "sell"]
BPS = Decimal(10_000)
BPS_QUANTUM = Decimal("0.0001")  # spread, volatility and deviations are emitted to 1/10000 bps
STRENGTH_QUANTUM = Decimal("0.0001")
DEFAULT_MIN_INTERVAL_MS = 1_000  # at most one signal per market per second, on exchange time
DEFAULT_MAX_SAMPLE_GAP_MS = 60_000  # a longer silence restarts the window (returns across it are not comparable)
MAX_REASON_CHARS = 200

_SIGNAL_NAMESPACE = uuid.UUID("0b4f3a52-5f57-4d0e-9c39-1d1f6c1e8a7b")


def signal_id_for(strategy: str, market: str, nonce: int) -> str:
    """Deterministic: replaying the same book entry through the same strategy gives the same id."""
    return str(uuid.uuid5(_SIGNAL_NAMESPACE, f"{strategy}|{market}|{nonce}"))


# -- book entries ---------------------------------------------------------------------------------

class BadBookEntry(ValueError):
    """A `bitvavo:book` entry off-contract; the message is the dead-letter reason, `kind` the metric label."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class BookTop:
    market: str
    nonce: int
    ts: int  # exchange time, ms
    recv_ts: int | None
    bid: Decimal
    bid_size: Decimal
    ask: Decimal
    ask_size: Decimal

    @property
    def mid(self) -> Decimal:
        return (self.bid + self.ask) / 2

    @property
    def spread_bps(self) -> Decimal:
        return ((self.ask - self.bid) / self.mid * BPS).quantize(BPS_QUANTUM)


_ENVELOPE = ("v", "ts", "market", "nonce")
_LEVELS = (("bid", "bid_size"), ("ask", "ask_size"))


def parse_book_entry(fields: Mapping[str, str], known_market: Callable[[str], bool]) -> BookTop | None:
    """The top of book in an entry, or None when one side of the book is empty.

    Ingest omits both fields of an empty side (bid and bid_size, or ask and ask_size): that is
    a valid one-sided book with no mid, not bad input. One field of a pair alone is.
    """
    for name in _ENVELOPE:
        if name not in fields:
            raise BadBookEntry("missing_field", f"missing field {name!r} (a book entry carries v, ts, market, "
                                                "nonce, bid, bid_size, ask, ask_size)")
    present = []
    for price, size in _LEVELS:
        if (price in fields) != (size in fields):
            missing = size if price in fields else price
            raise BadBookEntry("missing_field", f"missing field {missing!r} ({price} and {size} come together)")
        present.append(price in fields)
    try:
        entry = decode_entry(fields, BOOK_SCHEMA)
    except EntryDecodeError as exc:
        raise BadBookEntry("malformed", str(exc)) from None
    market = entry["market"]
    if not MARKET_PATTERN.match(market):
        raise BadBookEntry("unknown_market", f"unknown market {market[:40]!r}: not a Bitvavo market name "
                                             "such as BTC-EUR")
    if not known_market(market):
        raise BadBookEntry("unknown_market", f"unknown market {market!r}: not one of the configured markets")
    if entry["nonce"] < 0:
        raise BadBookEntry("malformed", f"field 'nonce' must be >= 0, got {entry['nonce']}")
    for name in ("bid", "bid_size", "ask", "ask_size"):
        if name in entry and entry[name] <= 0:
            raise BadBookEntry("bad_price", f"field {name!r} must be positive, got {fields[name]!r}")
    if not all(present):
        return None
    bid, ask = entry["bid"], entry["ask"]
    if bid >= ask:
        raise BadBookEntry("crossed", f"crossed book: bid {fields['bid']} >= ask {fields['ask']}")
    return BookTop(market, entry["nonce"], entry["ts"], entry.get("recv_ts"), bid, entry["bid_size"], ask,
                   entry["ask_size"])


# -- the rolling window ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    ts: int
    mid: Decimal
    spread_bps: Decimal


class WindowReset(StrEnum):
    GAP = "gap"  # no sample for longer than max_sample_gap_ms
    NONCE_RESTART = "nonce_restart"  # a lower nonce with a newer exchange time: the sequence restarted


class MarketWindow:
    """The last `size` samples of one market, plus its idempotency and throttling marks."""

    __slots__ = ("last_nonce", "last_signal_ts", "last_ts", "samples", "size")

    def __init__(self, size: int, samples: Iterable[Sample] = (), *, last_nonce: int | None = None,
                 last_ts: int | None = None, last_signal_ts: int | None = None) -> None:
        if size < 2:
            raise ValueError("a window needs at least 2 samples (one return)")
        self.size = size
        self.samples: deque[Sample] = deque(samples, maxlen=size)
        self.last_nonce = last_nonce
        self.last_ts = last_ts
        self.last_signal_ts = last_signal_ts

    def copy(self) -> MarketWindow:
        return MarketWindow(self.size, self.samples, last_nonce=self.last_nonce, last_ts=self.last_ts,
                            last_signal_ts=self.last_signal_ts)

    def is_duplicate(self, nonce: int, ts: int) -> bool:
        """Already seen: a nonce not above the last one, unless its exchange time is newer (a restart)."""
        if self.last_nonce is None or nonce > self.last_nonce:
            return False
        return self.last_ts is None or ts <= self.last_ts

    def add(self, top: BookTop, *, max_gap_ms: int) -> WindowReset | None:
        """Append the entry's sample; returns why the window was emptied first, if it was."""
        reset: WindowReset | None = None
        if self.last_nonce is not None and top.nonce <= self.last_nonce:
            reset = WindowReset.NONCE_RESTART
        elif self.samples and top.ts - self.samples[-1].ts > max_gap_ms:
            reset = WindowReset.GAP
        if reset is not None:
            self.samples.clear()
            self.last_signal_ts = None
        self.samples.append(Sample(top.ts, top.mid, top.spread_bps))
        self.last_nonce = top.nonce
        self.last_ts = top.ts
        return reset

    def mean_mid(self) -> Decimal:
        return sum((s.mid for s in self.samples), Decimal(0)) / len(self.samples)

    def mean_spread_bps(self) -> Decimal:
        total = sum((s.spread_bps for s in self.samples), Decimal(0))
        return (total / len(self.samples)).quantize(BPS_QUANTUM)

    def volatility_bps(self) -> Decimal | None:
        """Root mean square of the log returns of mid between consecutive samples, in bps.

        Zero-mean (realised) volatility: over a few dozen ticks the mean return is noise, and
        this is defined from the first return on (SIGNAL_WINDOW >= 2). Computed in float,
        because ln and sqrt have no exact decimal answer and this is a statistic, not money;
        rounded to 1/10000 bps and returned as a Decimal so thresholds compare, and the
        emitted string is, what a reader would recompute.
        """
        if len(self.samples) < 2:
            return None
        mids = [float(s.mid) for s in self.samples]
        squares = [math.log(b / a) ** 2 for a, b in pairwise(mids)]
        return Decimal(f"{math.sqrt(sum(squares) / len(squares)) * 10_000:.4f}")

    def to_json(self) -> str:
        return orjson.dumps({"nonce": self.last_nonce, "ts": self.last_ts, "last_signal_ts": self.last_signal_ts,
                             "samples": [[s.ts, format_decimal(s.mid), format_decimal(s.spread_bps)]
                                         for s in self.samples]}).decode()

    @classmethod
    def from_json(cls, text: str, size: int) -> MarketWindow:
        """A persisted window (the newest `size` samples of it); ValueError when it is not one."""
        try:
            data = orjson.loads(text)
            samples = [Sample(int(ts), parse_decimal(mid, "mid"), parse_decimal(spread, "spread_bps"))
                       for ts, mid, spread in data["samples"]]
            return cls(size, samples[-size:], last_nonce=_optional_int(data["nonce"]),
                       last_ts=_optional_int(data["ts"]), last_signal_ts=_optional_int(data["last_signal_ts"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, DecimalParseError) as exc:
            raise ValueError(f"not a persisted market window: {exc}") from None


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {value!r}")
    return value


# -- strategies -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MarketState:
    """What a strategy sees: the entry just applied and the market's rolling window after it."""

    market: str
    nonce: int
    ts: int  # exchange time of the book entry, ms
    bid: Decimal
    bid_size: Decimal
    ask: Decimal
    ask_size: Decimal
    mid: Decimal
    spread_bps: Decimal
    mean_mid: Decimal  # over the window
    mean_spread_bps: Decimal
    volatility_bps: Decimal | None  # None until the window holds two samples
    sample_count: int
    last_signal_ts: int | None  # exchange time of this market's last signal (None since the last reset)


@dataclass(frozen=True)
class SignalParams:
    """Thresholds and limits: `Settings` (env) defaults, overridden by flow parameters."""

    max_spread_bps: Decimal
    min_volatility_bps: Decimal
    window: int
    min_interval_ms: int = DEFAULT_MIN_INTERVAL_MS
    max_book_age_ms: int = 5_000
    max_sample_gap_ms: int = DEFAULT_MAX_SAMPLE_GAP_MS
    options: Mapping[str, str] = field(default_factory=dict)  # free-form, for custom strategies

    def __post_init__(self) -> None:
        if not self.max_spread_bps.is_finite() or self.max_spread_bps <= 0:
            raise ValueError(f"max_spread_bps must be a positive number of bps, got {self.max_spread_bps}")
        if not self.min_volatility_bps.is_finite() or self.min_volatility_bps < 0:
            raise ValueError(f"min_volatility_bps must be >= 0 bps, got {self.min_volatility_bps}")
        if self.window < 2:
            raise ValueError(f"window must be >= 2 samples (a volatility needs two), got {self.window}")
        for name in ("min_interval_ms", "max_book_age_ms", "max_sample_gap_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_settings(cls, settings: Settings, *, max_spread_bps: Decimal | float | str | None = None,
                      min_volatility_bps: Decimal | float | str | None = None, window: int | None = None,
                      min_interval_ms: int | None = None, max_book_age_ms: int | None = None,
                      max_sample_gap_ms: int | None = None,
                      options: Mapping[str, str] | None = None) -> SignalParams:
        """Env defaults (SIGNAL_MAX_SPREAD_BPS, SIGNAL_MIN_VOLATILITY_BPS, SIGNAL_WINDOW, STALE_BOOK_MS);
        each override that is not None wins. ValueError names the bad parameter."""
        return cls(
            max_spread_bps=settings.signal_max_spread_bps if max_spread_bps is None
            else bps_parameter(max_spread_bps, "max_spread_bps"),
            min_volatility_bps=settings.signal_min_volatility_bps if min_volatility_bps is None
            else bps_parameter(min_volatility_bps, "min_volatility_bps"),
            window=settings.signal_window if window is None else window,
            min_interval_ms=DEFAULT_MIN_INTERVAL_MS if min_interval_ms is None else min_interval_ms,
            max_book_age_ms=settings.stale_book_ms if max_book_age_ms is None else max_book_age_ms,
            max_sample_gap_ms=DEFAULT_MAX_SAMPLE_GAP_MS if max_sample_gap_ms is None else max_sample_gap_ms,
            options=dict(options or {}),
        )

    def describe(self) -> dict[str, str]:
        return {"max_spread_bps": format_decimal(self.max_spread_bps),
                "min_volatility_bps": format_decimal(self.min_volatility_bps), "window": str(self.window),
                "min_interval_ms": str(self.min_interval_ms), "max_book_age_ms": str(self.max_book_age_ms),
                "max_sample_gap_ms": str(self.max_sample_gap_ms)}


def bps_parameter(value: Decimal | float | str, name: str) -> Decimal:
    """A threshold given as a flow parameter. The UI sends numbers as floats: a threshold in bps is
    not money, and the float's shortest repr is the number the operator typed."""
    if isinstance(value, float):
        value = repr(value)
    try:
        return parse_decimal(value.strip() if isinstance(value, str) else value, name)
    except DecimalParseError as exc:
        raise ValueError(f"parameter {exc}; give a number of bps such as 25 or \"2.5\"") from None


@dataclass(frozen=True)
class SignalDecision:
    side: Side
    strength: Decimal  # 0..1
    reason: str  # short, human readable

    def __post_init__(self) -> None:
        if self.side not in ("buy", "sell"):
            raise ValueError(f"side must be 'buy' or 'sell', got {self.side!r}")
        if not isinstance(self.strength, Decimal) or not self.strength.is_finite() or not 0 <= self.strength <= 1:
            raise ValueError(f"strength must be a Decimal in 0..1, got {self.strength!r}")
        if not self.reason or len(self.reason) > MAX_REASON_CHARS:
            raise ValueError(f"reason must be 1..{MAX_REASON_CHARS} characters")


class Strategy(Protocol):
    def __call__(self, state: MarketState, params: SignalParams, /) -> SignalDecision | None: ...


def baseline(state: MarketState, params: SignalParams) -> SignalDecision | None:
    """Mean reversion inside tight, moving markets.

    With a full window, a spread at most `max_spread_bps` and a volatility at least
    `min_volatility_bps`: buy when mid is below the window's mean mid, sell when above.
    Strength = |deviation from the mean| / volatility, capped at 1.
    """
    volatility = state.volatility_bps
    if state.sample_count < params.window or volatility is None or volatility == 0:
        return None
    if state.spread_bps > params.max_spread_bps or volatility < params.min_volatility_bps:
        return None
    deviation_bps = ((state.mid - state.mean_mid) / state.mean_mid * BPS).quantize(BPS_QUANTUM)
    if deviation_bps == 0:
        return None
    strength = min(Decimal(1), (abs(deviation_bps) / volatility).quantize(STRENGTH_QUANTUM))
    return SignalDecision(
        side="buy" if deviation_bps < 0 else "sell", strength=strength,
        reason=(f"mean-reversion: mid {format_decimal(deviation_bps)} bps from the {state.sample_count}-sample "
                f"mean; spread {format_decimal(state.spread_bps)} <= {format_decimal(params.max_spread_bps)} bps; "
                f"vol {format_decimal(volatility)} >= {format_decimal(params.min_volatility_bps)} bps"))


STRATEGIES: dict[str, Strategy] = {"baseline": baseline}


class StrategyLoadError(ValueError):
    """The strategy parameter names nothing callable."""


@dataclass(frozen=True)
class NamedStrategy:
    name: str  # goes into every signal (`strategy`) and its signal_id
    decide: Strategy


def load_strategy(spec: str) -> NamedStrategy:
    """A name from `STRATEGIES`, or `package.module:function` importable from the worker's checkout."""
    spec = spec.strip()
    if spec in STRATEGIES:
        return NamedStrategy(spec, STRATEGIES[spec])
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise StrategyLoadError(f"strategy {spec!r}: use one of {sorted(STRATEGIES)} or 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StrategyLoadError(f"strategy {spec!r}: cannot import {module_name!r}: {exc}") from None
    decide = getattr(module, attribute, None)
    if not callable(decide):
        raise StrategyLoadError(f"strategy {spec!r}: {module_name} has no callable {attribute!r}")
    return NamedStrategy(spec, decide)


class StrategyError(RuntimeError):
    """The strategy raised or returned something that is not a SignalDecision or None."""


# -- evaluation of one entry ----------------------------------------------------------------------

class Outcome(StrEnum):
    SIGNAL = "signal"
    QUIET = "quiet"  # the strategy said nothing
    DUPLICATE = "duplicate"  # nonce already seen for the market
    STALE = "stale"  # older than max_book_age_ms: feeds the window, never a signal
    THROTTLED = "throttled"  # within min_interval_ms of the market's last signal
    ONE_SIDED = "one_sided"  # an empty side of the book: no mid


@dataclass(frozen=True)
class Evaluation:
    outcome: Outcome
    market: str
    state: MarketState | None = None
    signal: dict[str, Any] | None = None  # contract fields (SIGNAL_SCHEMA + ts), typed
    window_reset: WindowReset | None = None
    window_changed: bool = False  # the window must be persisted
    previous: MarketWindow | None = field(default=None, repr=False)  # for restore()


class SignalEvaluator:
    """Per-market windows and one strategy; not thread-safe, one entry at a time, in stream order."""

    def __init__(self, strategy: NamedStrategy, params: SignalParams,
                 known_market: Callable[[str], bool] = lambda _market: True) -> None:
        self.strategy = strategy
        self.params = params
        self.known_market = known_market
        self.windows: dict[str, MarketWindow] = {}

    def load(self, market: str, persisted: str) -> None:
        self.windows[market] = MarketWindow.from_json(persisted, self.params.window)

    def evaluate(self, fields: Mapping[str, str], now_ms: int) -> Evaluation:
        """Apply one `bitvavo:book` entry; raises BadBookEntry or StrategyError (window left as it was)."""
        top = parse_book_entry(fields, self.known_market)
        if top is None:
            return Evaluation(Outcome.ONE_SIDED, str(fields["market"]))
        window = self.windows.get(top.market)
        if window is not None and window.is_duplicate(top.nonce, top.ts):
            return Evaluation(Outcome.DUPLICATE, top.market)
        previous = window.copy() if window is not None else None
        if window is None:
            window = self.windows[top.market] = MarketWindow(self.params.window)
        reset = window.add(top, max_gap_ms=self.params.max_sample_gap_ms)
        state = MarketState(top.market, top.nonce, top.ts, top.bid, top.bid_size, top.ask, top.ask_size, top.mid,
                            top.spread_bps, window.mean_mid(), window.mean_spread_bps(), window.volatility_bps(),
                            len(window.samples), window.last_signal_ts)
        evaluation = Evaluation(Outcome.QUIET, top.market, state, window_reset=reset, window_changed=True,
                                previous=previous)
        if now_ms - top.ts > self.params.max_book_age_ms:
            return replace(evaluation, outcome=Outcome.STALE)
        try:
            decision = self.strategy.decide(state, self.params)
            if decision is not None and not isinstance(decision, SignalDecision):
                raise TypeError(f"returned {type(decision).__name__}, not a SignalDecision or None")
        except Exception as exc:
            self.restore(evaluation)
            raise StrategyError(f"strategy {self.strategy.name!r} failed on {top.market} nonce {top.nonce}: "
                                f"{type(exc).__name__}: {exc}") from exc
        if decision is None:
            return evaluation
        if window.last_signal_ts is not None and top.ts - window.last_signal_ts < self.params.min_interval_ms:
            return replace(evaluation, outcome=Outcome.THROTTLED)
        window.last_signal_ts = top.ts
        signal = {"ts": top.ts, "signal_id": signal_id_for(self.strategy.name, top.market, top.nonce),
                  "market": top.market, "side": decision.side, "strength": decision.strength,
                  "reason": decision.reason, "ref_price": top.mid, "spread_bps": top.spread_bps,
                  # a custom strategy may emit from a single sample, where volatility is not defined yet
                  "volatility": state.volatility_bps if state.volatility_bps is not None else Decimal(0),
                  "strategy": self.strategy.name}
        return replace(evaluation, outcome=Outcome.SIGNAL, signal=signal)

    def restore(self, evaluation: Evaluation) -> None:
        """Undo an evaluation whose effects did not commit (the entry will be evaluated again)."""
        if not evaluation.window_changed:
            return
        if evaluation.previous is None:
            self.windows.pop(evaluation.market, None)
        else:
            self.windows[evaluation.market] = evaluation.previous

    def persisted(self, market: str) -> str:
        return self.windows[market].to_json()

