"""Frame routing of the WebSocket client, without a network (the socket is tested in integration)."""

import asyncio
import random
from typing import Any

import aiohttp
import pytest

from trading.backoff import Backoff
from trading.exchange.errors import InvalidRequestError
from trading.exchange.governor import RateGovernor
from trading.exchange.ws import BitvavoWebSocket


def make_client() -> tuple[BitvavoWebSocket, list[dict[str, Any]], list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    client = BitvavoWebSocket("ws://127.0.0.1:1/v2/", on_event=events.append, on_error_frame=errors.append)
    return client, events, errors


@pytest.mark.parametrize("garbage", [b"not json", b"[1,2]", b'"text"', b"", b"{"])
def test_malformed_frames_are_counted_and_skipped(garbage: bytes) -> None:
    client, events, errors = make_client()
    client._dispatch(garbage)
    client._dispatch(b'{"event":"book","market":"BTC-EUR","nonce":1,"bids":[],"asks":[]}')
    assert client.stats.malformed_frames == 1
    assert [e["nonce"] for e in events] == [1] and errors == []


def test_subscription_acks_are_recorded_not_forwarded() -> None:
    client, events, _ = make_client()
    client._dispatch(b'{"event":"subscribed","subscriptions":{"book":["BTC-EUR"]}}')
    assert client.acked_subscriptions == {"book": ["BTC-EUR"]} and events == []


def test_unsolicited_error_frames_reach_the_error_handler() -> None:
    client, events, errors = make_client()
    client._dispatch(b'{"action":"subscribe","errorCode":205,"error":"market parameter NOPE-EUR is invalid."}')
    assert errors[0]["errorCode"] == 205 and client.stats.error_frames == 1 and events == []


async def test_error_reply_fails_the_matching_request() -> None:
    client, _, _ = make_client()
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    client._pending[90] = future
    client._dispatch(b'{"action":"getBook","requestId":90,"market":"NOPE-EUR","errorCode":205,'
                     b'"error":"market parameter NOPE-EUR is invalid."}')
    with pytest.raises(InvalidRequestError) as info:
        await future
    assert info.value.error_code == 205 and info.value.action == "getBook"


def test_backoff_is_capped_jittered_and_resets() -> None:
    backoff = Backoff(base_s=0.5, cap_s=4.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(12)]
    assert all(0 <= d <= 4.0 for d in delays)
    assert max(delays[:2]) <= 1.0 and len(set(delays)) == len(delays)
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_a_failing_event_handler_is_counted_and_reading_goes_on() -> None:
    seen: list[int] = []

    def handler(frame: dict[str, Any]) -> None:
        if frame["nonce"] == 1:
            raise RuntimeError("consumer bug")
        seen.append(frame["nonce"])

    client = BitvavoWebSocket("ws://127.0.0.1:1/v2/", on_event=handler)
    for nonce in (1, 2):
        client._dispatch(f'{{"event":"book","market":"BTC-EUR","nonce":{nonce},"bids":[],"asks":[]}}'.encode())
    assert client.stats.handler_errors == 1 and seen == [2]


def test_a_websocket_ban_reaches_the_rate_governor() -> None:
    governor = RateGovernor()
    client = BitvavoWebSocket("ws://127.0.0.1:1/v2/", on_event=lambda f: None, governor=governor)
    client._dispatch(b'{"action":"getBook","errorCode":105,"error":"Your IP or API key has been banned for not '
                     b'respecting the rate limit. The ban expires at 4102444800000."}')
    assert governor.state().banned_until_ms == 4102444800000


class _BufferedSocket:
    """Stands in for aiohttp's socket while frames are queued: receive() returns without suspending,
    which a real socket does only for as long as its buffer happens to hold frames."""

    def __init__(self, frames: int) -> None:
        self._left = frames

    async def receive(self) -> aiohttp.WSMessage:
        if not self._left:
            return aiohttp.WSMessage(aiohttp.WSMsgType.CLOSED, None, None)
        self._left -= 1
        return aiohttp.WSMessage(aiohttp.WSMsgType.TEXT, b'{"event":"book","market":"BTC-EUR","nonce":1}', None)


async def test_a_feed_that_never_runs_dry_still_lets_other_tasks_run() -> None:
    turns = 0
    turns_seen: list[int] = []

    async def other_task() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    client = BitvavoWebSocket("ws://127.0.0.1:1/v2/", on_event=lambda frame: turns_seen.append(turns))
    other = asyncio.create_task(other_task())
    await asyncio.sleep(0)
    try:
        await client._read_loop(_BufferedSocket(1000))  # type: ignore[arg-type]
    finally:
        other.cancel()
    assert len(turns_seen) == 1000
    assert turns_seen[-1] - turns_seen[0] >= 5  # the other task ran while the burst was read
