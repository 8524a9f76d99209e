"""The Redis stream contract (design §4): key names, the one entry codec, and the publisher.

Encoding (`encode_entry`): every value becomes a string. `v` (schema version) comes first;
Decimal -> plain decimal string, int -> digits, bool -> "true"/"false", list/tuple/dict ->
compact JSON via orjson (Decimals inside as strings; nested values are not inspected
further, to keep the hot path cheap), None -> the field is omitted (absent means "no
value", so a reader never has to tell "" from a real empty string). Floats are refused: money
and prices are Decimal. Every entry must carry `ts`; market data also carries `recv_ts`.

`StreamPublisher` is for market data, where the lake (written first, independently) is the
record and Redis is the live bus: while Redis is down it drops batches and counts them
instead of stalling the ingest loop, and retries after a capped, jittered backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
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
KEY_PNL = "trading:pnl"
KEY_UNIVERSE = "trading:universe"
KEY_TRADING_STATE = "trading:state"  # string: active (default when unset) / reduce-only / halted
KEY_GOLIVE = "trading:golive"  # hash: the latest go-live decision (trading/golive.py)
KEY_OPEN_INTENTS = "trading:intents:open"  # hash intent_id -> market: sent by the core, not yet final
KEY_INFLIGHT = "orders:inflight"  # hash intent_id -> JSON: live orders recorded before they are sent
KEY_OPEN_GAPS = "bitvavo:gaps:open"  # hash market -> JSON {kind, since_ms}: a book being resynced


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


def _text(value: Any) -> str:
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
    fields = {_text(k): _text(val) for k, val in raw.items()}
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


# One round trip per batch: the entries travel as one JSON argument and the script XADDs them.
# redis-py's asyncio pipeline packs every argument in Python and tops out near 10k XADD/s on a
# slow 2-core box; this path measured about 4x that there, most of it the Python-side encode.
_XADD_BATCH_LUA = """
local maxlens = cjson.decode(ARGV[1])
local entries = cjson.decode(ARGV[2])
for i = 1, #entries do
  local e = entries[i]
  redis.call('XADD', KEYS[e[1]], 'MAXLEN', '~', maxlens[e[1]], '*', unpack(e, 2))
end
return #entries
"""


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


class StreamPublisher:
    """Batches encoded entries and XADDs each batch in one round trip, trimmed with MAXLEN ~.

    `publish()` buffers; a full batch is sent in the background while the caller goes on
    encoding the next one (one batch in flight, so order is kept). Call `flush()` when the
    input goes idle. A failed write drops its batch (counted), marks Redis down and opens a
    backoff window in which batches are dropped without touching the network; the first
    write after the window is the reconnect attempt.
    """

    def __init__(self, url: str, *, maxlen: int = 100_000, maxlen_by_stream: Mapping[str, int] | None = None,
                 batch_size: int = 500, timeout_s: float = 2.0, backoff: Backoff | None = None) -> None:
        if maxlen <= 0 or batch_size <= 0:
            raise ValueError("maxlen and batch_size must be positive")
        self._client = async_client(url)
        # The publisher has its own backoff; redis-py's default retries would stall the hot path.
        self._client.set_retry(Retry(NoBackoff(), 0))
        self._script = self._client.register_script(_XADD_BATCH_LUA)
        self._maxlen = maxlen
        self._maxlen_by_stream = dict(maxlen_by_stream or {})
        self._batch_size = batch_size
        self._timeout_s = timeout_s
        self._backoff = backoff or Backoff(base_s=0.1, cap_s=5.0)
        self._retry_at = 0.0
        self._keys: list[str] = []  # streams of the pending batch; an entry names its stream by 1-based index
        self._key_index: dict[str, int] = {}
        self._entries: list[list[Any]] = []
        self._in_flight: asyncio.Task[bool] | None = None
        self._redis_up = False
        self.stats = PublisherStats()

    @property
    def redis_up(self) -> bool:
        """True after a successful write, False before the first one and after a failure."""
        return self._redis_up

    @property
    def pending(self) -> int:
        """Entries buffered and not yet handed to a write."""
        return len(self._entries)

    async def publish(self, stream: str, fields: Mapping[str, Any], *, v: int = SCHEMA_VERSION) -> None:
        entry: list[Any] = [0]
        entry.extend(chain.from_iterable(_encoded_items(fields, v)))
        position = self._key_index.get(stream)
        if position is None:
            self._keys.append(stream)
            position = self._key_index[stream] = len(self._keys)
        entry[0] = position
        self._entries.append(entry)
        if len(self._entries) >= self._batch_size:
            await self._send_pending()

    async def flush(self) -> bool:
        """Write everything pending; True when the last batch reached Redis (or nothing was pending)."""
        if self._entries:
            await self._send_pending()
        task = self._in_flight
        if task is None:
            return True
        written = await asyncio.shield(task)
        if self._in_flight is task:
            self._in_flight = None
        return written

    async def _send_pending(self) -> None:
        if self._in_flight is not None:
            # One batch in flight keeps stream order and bounds memory. Shielded: a caller's
            # timeout must not cancel a write that the next batch will wait for.
            await asyncio.shield(self._in_flight)
        keys, entries = self._keys, self._entries
        self._keys, self._key_index, self._entries = [], {}, []
        self._in_flight = asyncio.create_task(self._write(keys, entries))

    async def _write(self, keys: list[str], entries: list[list[Any]]) -> bool:
        if not self._redis_up and time.monotonic() < self._retry_at:
            self.stats.entries_dropped += len(entries)
            return False
        maxlens = [str(self._maxlen_by_stream.get(key, self._maxlen)) for key in keys]
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._script(keys=keys, args=[orjson.dumps(maxlens), orjson.dumps(entries)])
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._on_failure(exc, len(entries))
            return False
        if not self._redis_up:
            self._redis_up = True
            self._backoff.reset()
            if self.stats.batches_failed:
                self.stats.reconnects += 1
                log.info("redis is back: stream writes resumed")
        self.stats.batches_written += 1
        self.stats.entries_written += len(entries)
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
