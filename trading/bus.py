"""The Redis stream contract (design §4): key names, the one entry codec, and the publisher.

Encoding (`encode_entry`): every value becomes a string. `v` (schema version) comes first;
Decimal -> plain decimal string, int -> digits, bool -> "true"/"false", list/tuple/dict ->
compact JSON via orjson (Decimals inside as strings; nested values are not inspected
further, to keep the hot path cheap), None -> the field is omitted (absent means "no
value", so a reader never has to tell "" from a real empty string). Floats are refused: money
and prices are Decimal. Every entry must carry `ts`; market data also carries `recv_ts`.

`StreamPublisher` is for market data, where the lake (written first, independently) is the
record and Redis is the live bus: it writes batches in the background, and while Redis is
down it drops batches and counts them instead of stalling the ingest loop, and retries after
a capped, jittered backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from itertools import chain
from types import TracebackType
from typing import Any

import orjson
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from trading.backoff import Backoff
from trading.decimals import DecimalParseError, format_decimal, parse_decimal
from trading.redis_conn import async_client

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

STREAM_TICKER24H = "bitvavo:ticker24h"
STREAM_BOOK = "bitvavo:book"
STREAM_ORDERBOOK_UPDATE = "bitvavo:orderbook:update"
ORDERS_SHADOW = "orders:shadow"
ORDERS_EXECUTED = "orders:executed"
TRADING_EVENTS = "trading:events"
KEY_KILL = "trading:kill"
KEY_KILL_DRILL = "trading:kill:drill"  # set while a preflight drill holds the switch; an operator flip clears it
FLATTEN_AUTH_PREFIX = "flatten:auth:"  # + intent_id: an operator's flatten wrote this sale (trading/flatten.py)
FLATTEN_AUTH_TTL_S = 3600  # well beyond any flatten's wait: the executor reads it before the first send
KEY_PNL_PAPER = "trading:pnl:paper"  # the paper ledger (dry-run fills); docs/pnl.md
KEY_PNL_LIVE = "trading:pnl:live"  # the live ledger (exchange fills): paper and live never share a book
KEY_UNIVERSE = "trading:universe"
KEY_TRADING_STATE = "trading:state"  # string: active (default when unset) / reduce-only / halted
KEY_GOLIVE = "trading:golive"  # hash: the latest go-live decision (trading/golive.py)
KEY_OPEN_INTENTS = "trading:intents:open"  # hash intent_id -> JSON {market, side, notional, amount, ts}: not yet booked
KEY_INFLIGHT = "orders:inflight"  # hash intent_id -> JSON: live orders recorded before they are sent
KEY_LIVE_OPEN = "orders:live:open"  # hash intent_id -> JSON: live orders sent, reported, still followed
KEY_OPEN_GAPS = "bitvavo:gaps:open"  # hash market -> JSON {kind, since_ms}: a book being resynced


def flatten_authorization_key(intent_id: str) -> str:
    """Written by the flatten flow with its intent, in one transaction: only an intent with it may pass the
    kill switch as a flatten sale (an `orders:shadow` writer alone cannot forge one; Redis ACLs keep the
    `flatten:auth:*` keys to the flatten flow)."""
    return FLATTEN_AUTH_PREFIX + intent_id


def pnl_key(dry_run: bool) -> str:
    """The ledger hash of a mode: paper fills and live fills are two books, never one."""
    return KEY_PNL_PAPER if dry_run else KEY_PNL_LIVE


def stream_candles(interval: str) -> str:
    return f"bitvavo:candles:{interval}"


def dead_letter_stream(stream: str) -> str:
    """Where a consumer moves an entry that keeps failing (design §4)."""
    return f"{stream}:dead"


class FieldKind(Enum):
    STR = "str"
    INT = "int"
    DECIMAL = "decimal"
    BOOL = "bool"
    JSON = "json"


Schema = Mapping[str, FieldKind]

_DEC = FieldKind.DECIMAL
TICKER24H_SCHEMA: Schema = {
    "market": FieldKind.STR, "open": _DEC, "high": _DEC, "low": _DEC, "last": _DEC, "volume": _DEC,
    "volumeQuote": _DEC, "bid": _DEC, "bidSize": _DEC, "ask": _DEC, "askSize": _DEC,
}
BOOK_SCHEMA: Schema = {
    "market": FieldKind.STR, "nonce": FieldKind.INT, "bid": _DEC, "bid_size": _DEC, "ask": _DEC, "ask_size": _DEC,
}
ORDERBOOK_UPDATE_SCHEMA: Schema = {
    "market": FieldKind.STR, "nonce": FieldKind.INT, "bids": FieldKind.JSON, "asks": FieldKind.JSON,
}
CANDLE_SCHEMA: Schema = {
    "market": FieldKind.STR, "interval": FieldKind.STR, "open_ts": FieldKind.INT,
    "open": _DEC, "high": _DEC, "low": _DEC, "close": _DEC, "volume": _DEC,
}

SIGNAL_SCHEMA: Schema = {
    "signal_id": FieldKind.STR, "market": FieldKind.STR, "side": FieldKind.STR, "strength": _DEC,
    "reason": FieldKind.STR, "ref_price": _DEC, "spread_bps": _DEC, "volatility": _DEC, "strategy": FieldKind.STR,
}
INTENT_SCHEMA: Schema = {
    "intent_id": FieldKind.STR, "signal_id": FieldKind.STR, "market": FieldKind.STR, "side": FieldKind.STR,
    "order_type": FieldKind.STR, "amount": _DEC, "amount_quote": _DEC, "price": _DEC,
    "time_in_force": FieldKind.STR, "dry_run": FieldKind.BOOL, "notional": _DEC, "reduce_only": FieldKind.BOOL,
    "purpose": FieldKind.STR, "scope": FieldKind.STR,  # flatten intents only (trading/orders.py); absent: a trade
}
EXECUTION_SCHEMA: Schema = {
    "intent_id": FieldKind.STR, "order_id": FieldKind.STR, "market": FieldKind.STR, "side": FieldKind.STR,
    "status": FieldKind.STR, "filled_amount": _DEC, "filled_amount_quote": _DEC, "avg_price": _DEC, "fee": _DEC,
    "fee_currency": FieldKind.STR, "dry_run": FieldKind.BOOL, "fills": FieldKind.JSON,
}
EVENT_SCHEMA: Schema = {
    "type": FieldKind.STR, "severity": FieldKind.STR, "market": FieldKind.STR, "intent_id": FieldKind.STR,
    "detail": FieldKind.JSON,
}

# The envelope every entry carries, whatever its stream.
_ENVELOPE_INTS = ("v", "ts", "recv_ts")


class EntryEncodeError(TypeError):
    """A field value has no representation in the stream contract."""


class EntryDecodeError(ValueError):
    """A stream entry does not follow the contract; the message names the field."""


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format_decimal(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _encode_value(key: str, value: Any) -> str:
    kind = type(value)  # exact types first: the hot path (book update rows) is str, int and lists
    if kind is str:
        return value  # type: ignore[no-any-return]
    if kind is int:
        return str(value)
    if kind is list:
        try:
            return orjson.dumps(value, default=_json_default).decode()
        except TypeError as exc:
            raise EntryEncodeError(f"field {key!r}: {exc}") from None
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise EntryEncodeError(f"field {key!r}: {value} is not a finite decimal")
        return format_decimal(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):  # str subclasses such as StrEnum members
        return str.__str__(value)
    if isinstance(value, int):  # int subclasses such as IntEnum members
        return int.__repr__(value)
    if isinstance(value, (list, tuple, dict)):
        try:
            return orjson.dumps(value, default=_json_default).decode()
        except TypeError as exc:
            raise EntryEncodeError(f"field {key!r}: {exc}") from None
    if isinstance(value, float):
        raise EntryEncodeError(f"field {key!r}: float {value!r} refused; use Decimal (money is never float)")
    raise EntryEncodeError(f"field {key!r}: cannot encode {type(value).__name__}")


_PLAIN_TYPES = frozenset((str, int))  # exact types whose str() is already the contract form


def _encoded_items(fields: Mapping[str, Any], v: int) -> Iterator[tuple[str, str]]:
    if "ts" not in fields:
        raise EntryEncodeError("every entry carries 'ts' (exchange time, ms)")
    # A row that carries its own `v` (the same dict feeds the lake and the stream) keeps it.
    if "v" in fields:
        if type(fields["v"]) is not int:
            raise EntryEncodeError(f"field 'v' must be an integer schema version, got {fields['v']!r}")
        head: tuple[tuple[str, str], ...] = ()
    else:
        head = (("v", str(v)),)
    values = fields.values()
    if _PLAIN_TYPES.issuperset(map(type, values)):  # the common case, converted in C
        return chain(head, zip(fields, map(str, values), strict=True))
    return chain(head, ((key, _encode_value(key, value)) for key, value in fields.items() if value is not None))


def encode_entry(fields: Mapping[str, Any], *, v: int = SCHEMA_VERSION) -> dict[str, str]:
    """Stream entry fields as strings, `v` first; None values are omitted."""
    return dict(_encoded_items(fields, v))


def as_text(value: Any) -> str:
    """A Redis reply value as str, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode_value(key: str, text: str, kind: FieldKind) -> Any:
    if kind is FieldKind.STR:
        return text
    if kind is FieldKind.DECIMAL:
        try:
            return parse_decimal(text, key)
        except DecimalParseError as exc:
            raise EntryDecodeError(str(exc)) from None
    if kind is FieldKind.INT:
        try:
            return int(text)
        except ValueError:
            raise EntryDecodeError(f"field {key!r} must be an integer, got {text!r}") from None
    if kind is FieldKind.BOOL:
        if text == "true":
            return True
        if text == "false":
            return False
        raise EntryDecodeError(f"field {key!r} must be 'true' or 'false', got {text!r}")
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        raise EntryDecodeError(f"field {key!r} must be JSON, got {text[:80]!r}") from None


def decode_entry(raw: Mapping[Any, Any], schema: Schema | None = None, *,
                 max_version: int = SCHEMA_VERSION) -> dict[str, Any]:
    """Fields of one entry (str or bytes, as redis-py returns them) with their types restored.

    `v`, `ts` and `recv_ts` become ints; fields named in `schema` get their kind; any other
    field stays a string. An entry written by a newer schema than `max_version` is refused
    rather than half-understood.
    """
    fields = {as_text(k): as_text(val) for k, val in raw.items()}
    if "v" not in fields or "ts" not in fields:
        raise EntryDecodeError(f"entry lacks 'v' or 'ts': {sorted(fields)}")
    out: dict[str, Any] = dict(fields)
    for key in _ENVELOPE_INTS:
        if key in fields:
            out[key] = _decode_value(key, fields[key], FieldKind.INT)
    if out["v"] > max_version:
        raise EntryDecodeError(f"entry has schema version {out['v']}; this reader knows up to {max_version}")
    if schema:
        for key, kind in schema.items():
            if key in fields:
                out[key] = _decode_value(key, fields[key], kind)
    return out


# One round trip per batch: the entries travel as one JSON argument, grouped by stream (each entry
# a flat array of field/value strings), and the script XADDs them in order. redis-py's asyncio
# pipeline packs every argument in Python and tops out near 10k XADD/s on a slow 2-core box; this
# path measured about 4x that there.
_XADD_BATCH_LUA = """
local maxlens = cjson.decode(ARGV[1])
local groups = cjson.decode(ARGV[2])
local written = 0
for k = 1, #groups do
  local key, maxlen, entries = KEYS[k], maxlens[k], groups[k]
  for i = 1, #entries do
    redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', unpack(entries[i]))
  end
  written = written + #entries
end
return written
"""


def encoded_entry(fields: Mapping[str, Any], *, v: int = SCHEMA_VERSION) -> bytes:
    """One entry as `StreamPublisher.add_encoded` takes it: the JSON array of its field/value strings
    in `encode_entry`'s order. Raises `EntryEncodeError` for a value the contract cannot carry."""
    return orjson.dumps(list(chain.from_iterable(_encoded_items(fields, v))))


@dataclass
class PublisherStats:
    entries_written: int = 0
    batches_written: int = 0
    batches_failed: int = 0  # a write to Redis was attempted and failed
    # Entries of failed batches and of batches skipped while backing off. A batch that timed out
    # may still land once a hung Redis wakes up; consumers are idempotent on their natural key.
    entries_dropped: int = 0
    reconnects: int = 0  # first successful write after a failure
    last_error: str = ""


class _Batch:
    """Encoded entries, grouped by stream in first-seen order (per-stream order kept)."""

    __slots__ = ("bodies", "size")

    def __init__(self) -> None:
        self.bodies: dict[str, bytearray] = {}  # stream -> its entries' JSON arrays, comma-separated
        self.size = 0


def _payload(batches: list[_Batch]) -> tuple[list[str], bytes]:
    """KEYS and the entries argument of one Lua call carrying `batches`, in order."""
    bodies: dict[str, list[bytearray]] = {}
    for batch in batches:
        for stream, body in batch.bodies.items():
            bodies.setdefault(stream, []).append(body)
    return list(bodies), b"[[" + b"],[".join(b",".join(parts) for parts in bodies.values()) + b"]]"


class StreamPublisher:
    """Batches encoded entries and XADDs each batch in one round trip, trimmed with MAXLEN ~.

    Entries are encoded when they are added (a bad one is refused then, and nothing else is
    affected) and cut into batches of `batch_size`. One background writer sends released
    batches in order, one call at a time (with up to `batches_per_call` batches when they queue
    up), so per-stream order is kept and the caller never waits for Redis unless it asks to:

    - `publish()` adds an entry and, once a batch is full, waits for the batch before it to be
      written and releases it: one batch in flight while the caller encodes the next.
    - `add()`/`add_encoded()` only buffer; `release()` hands everything buffered to the writer
      (the ingest sink releases right after the lake write, so Redis never runs ahead of the
      lake). `unsent` and `wait_unsent_below()` let such a caller bound what waits for Redis.
    - `flush()` releases everything and waits until it is written.

    A failed write drops its batch (counted), marks Redis down and opens a backoff window in
    which batches are dropped without touching the network; the first write after the window is
    the reconnect attempt.
    """

    def __init__(self, url: str, *, maxlen: int = 100_000, maxlen_by_stream: Mapping[str, int] | None = None,
                 batch_size: int = 500, batches_per_call: int = 4, timeout_s: float = 2.0,
                 backoff: Backoff | None = None) -> None:
        if maxlen <= 0 or batch_size <= 0 or batches_per_call <= 0:
            raise ValueError("maxlen, batch_size and batches_per_call must be positive")
        self._client = async_client(url)
        # The publisher has its own backoff; redis-py's default retries would stall the hot path.
        self._client.set_retry(Retry(NoBackoff(), 0))
        self._script = self._client.register_script(_XADD_BATCH_LUA)
        self._maxlen = maxlen
        self._maxlen_by_stream = dict(maxlen_by_stream or {})
        self._batch_size = batch_size
        self._batches_per_call = batches_per_call
        self._timeout_s = timeout_s
        self._backoff = backoff or Backoff(base_s=0.1, cap_s=5.0)
        self._retry_at = 0.0
        self._open = _Batch()          # being filled
        self._held: list[_Batch] = []  # full, not released yet
        self._held_entries = 0
        self._queue: deque[_Batch] = deque()  # released, waiting for (or in) the writer
        self._unsent = 0
        self._writer: asyncio.Task[bool] | None = None  # drains the queue; its result: did the last write land
        self._progress: list[asyncio.Future[None]] = []  # waiters of wait_unsent_below
        self._redis_up = False
        self.stats = PublisherStats()

    @property
    def redis_up(self) -> bool:
        """True after a successful write, False before the first one and after a failure."""
        return self._redis_up

    @property
    def pending(self) -> int:
        """Entries buffered and not yet handed to the writer."""
        return self._held_entries + self._open.size

    @property
    def unsent(self) -> int:
        """Entries handed to the writer whose write has not finished yet."""
        return self._unsent

    def add(self, stream: str, fields: Mapping[str, Any], *, v: int = SCHEMA_VERSION) -> None:
        """Encode and buffer one entry until `release()` (or a `publish()` that releases)."""
        self.add_encoded(stream, encoded_entry(fields, v=v))

    def add_encoded(self, stream: str, entry: bytes) -> None:
        """Buffer one entry already encoded as `encoded_entry` makes it (the caller vouches for it)."""
        batch = self._open
        body = batch.bodies.get(stream)
        if body is None:
            batch.bodies[stream] = bytearray(entry)
        else:
            body += b","
            body += entry
        batch.size += 1
        if batch.size >= self._batch_size:
            self._held.append(batch)
            self._held_entries += batch.size
            self._open = _Batch()

    async def publish(self, stream: str, fields: Mapping[str, Any], *, v: int = SCHEMA_VERSION) -> None:
        self.add(stream, fields, v=v)
        if self._held:
            await self._wait_idle()
            self.release()

    def release(self) -> None:
        """Hand every buffered entry to the background writer (a partial batch too)."""
        if self._open.size:
            self._held.append(self._open)
            self._held_entries += self._open.size
            self._open = _Batch()
        if not self._held:
            return
        self._queue.extend(self._held)
        self._unsent += self._held_entries
        self._held, self._held_entries = [], 0
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._drain())

    def drop_pending(self) -> None:
        """Drop the buffered entries not yet released (counted in `entries_dropped`)."""
        self.stats.entries_dropped += self.pending
        self._open, self._held, self._held_entries = _Batch(), [], 0

    async def wait_unsent_below(self, limit: int) -> None:
        """Return once fewer than `limit` released entries wait for Redis."""
        loop = asyncio.get_running_loop()
        while self._unsent >= limit and self._writer is not None and not self._writer.done():
            waiter = loop.create_future()
            self._progress.append(waiter)
            await waiter

    async def flush(self) -> bool:
        """Write everything buffered; True when the last batch reached Redis (or nothing was pending)."""
        self.release()
        writer = self._writer
        if writer is None:
            return True
        written = await asyncio.shield(writer)
        if self._writer is writer:
            self._writer = None
        return written

    async def _wait_idle(self) -> None:
        # Shielded: a caller's timeout must not cancel writes that later batches wait for.
        if self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def _drain(self) -> bool:
        written = True
        queue = self._queue
        try:
            while queue:
                # The writer runs only when the caller yields, which may be seldom under load: one
                # round trip then takes every batch queued meanwhile (up to batches_per_call).
                batches = [queue[i] for i in range(min(len(queue), self._batches_per_call))]
                written = await self._write(batches)
                for batch in batches:
                    queue.popleft()
                    self._unsent -= batch.size
                self._wake_waiters()
        finally:
            self._wake_waiters()
        return written

    def _wake_waiters(self) -> None:
        waiters, self._progress = self._progress, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _write(self, batches: list[_Batch]) -> bool:
        size = sum(batch.size for batch in batches)
        if not self._redis_up and time.monotonic() < self._retry_at:
            self.stats.entries_dropped += size
            return False
        keys, payload = _payload(batches)
        maxlens = [str(self._maxlen_by_stream.get(key, self._maxlen)) for key in keys]
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._script(keys=keys, args=[orjson.dumps(maxlens), payload])
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._on_failure(exc, size)
            return False
        if not self._redis_up:
            self._redis_up = True
            self._backoff.reset()
            if self.stats.batches_failed:
                self.stats.reconnects += 1
                log.info("redis is back: stream writes resumed")
        self.stats.batches_written += len(batches)
        self.stats.entries_written += size
        return True

    def _on_failure(self, exc: BaseException, size: int) -> None:
        self.stats.batches_failed += 1
        self.stats.entries_dropped += size
        self.stats.last_error = f"{type(exc).__name__}: {exc}"
        delay = self._backoff.next_delay()
        self._retry_at = time.monotonic() + delay
        if self._redis_up:
            log.warning("redis write failed (%s); dropping stream batches for %.2fs, the lake still has them",
                        self.stats.last_error, delay)
        self._redis_up = False

    async def aclose(self) -> None:
        """Flush what is pending, then close the connection pool."""
        try:
            await self.flush()
        finally:
            await self._client.aclose()

    async def __aenter__(self) -> StreamPublisher:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
