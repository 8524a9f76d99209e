"""WebSocket subscriptions and fan-out: an event is serialised once and queued to every subscriber.

Channel keys are the channel names, except candles, keyed per interval ('candles:1m').
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

CHANNELS = ("ticker", "ticker24h", "book", "trades", "candles", "account")
CANDLES_PREFIX = "candles:"


class Subscriber(Protocol):
    def send(self, text: str) -> None: ...


class Hub:
    def __init__(self) -> None:
        self._index: dict[tuple[str, str], dict[Subscriber, None]] = {}
        # Per subscriber, its subscriptions in the order they were made (the ack lists them).
        self._subscriptions: dict[Subscriber, dict[str, dict[str, None]]] = {}

    def has(self, key: str, market: str) -> bool:
        return (key, market) in self._index

    def publish(self, key: str, market: str, text: str) -> None:
        subscribers = self._index.get((key, market))
        if subscribers:
            for subscriber in list(subscribers):
                subscriber.send(text)

    def subscribe(self, subscriber: Subscriber, key: str, markets: Iterable[str]) -> list[str]:
        """Add subscriptions; returns the markets that are new for this subscriber."""
        mine = self._subscriptions.setdefault(subscriber, {}).setdefault(key, {})
        added = []
        for market in markets:
            if market not in mine:
                mine[market] = None
                self._index.setdefault((key, market), {})[subscriber] = None
                added.append(market)
        return added

    def unsubscribe(self, subscriber: Subscriber, key: str, markets: Iterable[str] | None) -> None:
        """Drop subscriptions to `markets` (all markets of the channel when None)."""
        mine = self._subscriptions.get(subscriber, {})
        current = mine.get(key)
        if current is None:
            return
        for market in list(current if markets is None else markets):
            if market in current:
                del current[market]
                self._drop_index(subscriber, key, market)
        if not current:
            del mine[key]

    def remove(self, subscriber: Subscriber) -> None:
        for key, markets in self._subscriptions.pop(subscriber, {}).items():
            for market in markets:
                self._drop_index(subscriber, key, market)

    def subscriptions(self, subscriber: Subscriber) -> dict[str, Any]:
        """As the subscribed/unsubscribed ack shows them: candles nested by interval."""
        result: dict[str, Any] = {}
        for key, markets in self._subscriptions.get(subscriber, {}).items():
            if key.startswith(CANDLES_PREFIX):
                result.setdefault("candles", {})[key[len(CANDLES_PREFIX):]] = list(markets)
            else:
                result[key] = list(markets)
        return result

    def _drop_index(self, subscriber: Subscriber, key: str, market: str) -> None:
        subscribers = self._index.get((key, market))
        if subscribers is not None:
            subscribers.pop(subscriber, None)
            if not subscribers:
                del self._index[(key, market)]
