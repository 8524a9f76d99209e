"""Book updates applied per second: our OrderBook/BookSync vs the official SDK's algorithm.

Both consume the same generated sequence of `book` events (padded strings as on the wire,
1-4 level changes per event, inserts, size changes and deletes) starting from the same
100-levels-per-side snapshot. The SDK's own local-book path crashes (spec §8 item 3), so its
insertion algorithm `sortAndInsert` is called directly, as `processLocalBook` would.
"""

from __future__ import annotations

import copy
import gc
import random
import time
from decimal import Decimal
from typing import Any

from python_bitvavo_api.bitvavo import asksCompare, bidsCompare, sortAndInsert

from trading.book import BookSync
from trading.exchange.models import BookSnapshot

TICK = Decimal("0.01")


def generate(levels: int, count: int, seed: int = 7) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rng = random.Random(seed)
    mid = 236190  # in ticks: 2361.90 EUR
    bids = {mid - 1 - i: rng.randint(1, 10**8) for i in range(levels)}
    asks = {mid + i: rng.randint(1, 10**8) for i in range(levels)}

    def price(ticks: int) -> str:
        return f"{ticks // 100}.{ticks % 100:02d}"

    def size(units: int) -> str:
        return f"{units // 10**8}.{units % 10**8:08d}"

    snapshot = {"market": "ETH-EUR", "nonce": 1,
                "bids": [[price(p), size(bids[p])] for p in sorted(bids, reverse=True)],
                "asks": [[price(p), size(asks[p])] for p in sorted(asks)]}
    events = []
    for nonce in range(2, count + 2):
        changes: dict[str, list[list[str]]] = {"bids": [], "asks": []}
        for _ in range(rng.randint(1, 4)):
            is_bid = rng.random() < 0.5
            side, side_name, sign = (bids, "bids", -1) if is_bid else (asks, "asks", 1)
            best, other_best = (max(bids), min(asks)) if is_bid else (min(asks), max(bids))
            roll = rng.random()
            if roll < 0.5:                                  # size change anywhere in the book
                level = rng.choice(list(side))
                side[level] = rng.randint(1, 10**8)
            elif roll < 0.75 or len(side) <= levels:        # new level, mostly near the top
                level = best + sign * int(rng.expovariate(1 / (levels / 4)))
                if (is_bid and level >= other_best) or (not is_bid and level <= other_best):
                    level = best
                side[level] = rng.randint(1, 10**8)
            else:                                           # delete, keeping ~`levels` per side
                level = rng.choice(list(side))
                del side[level]
                changes[side_name].append([price(level), "0"])
                continue
            changes[side_name].append([price(level), size(side[level])])
        events.append({"event": "book", "market": "ETH-EUR", "nonce": nonce, **changes,
                       "timestamp": 1790126693594483831 + nonce})
    return snapshot, events


def run_ours(snapshot: dict[str, Any], events: list[dict[str, Any]]) -> tuple[float, BookSync]:
    sync = BookSync("ETH-EUR")
    sync.on_snapshot(BookSnapshot.from_wire(snapshot))
    start = time.perf_counter()
    for frame in events:
        sync.on_update(frame)
    return time.perf_counter() - start, sync


def run_sdk(snapshot: dict[str, Any], events: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
    book = copy.deepcopy(snapshot)
    start = time.perf_counter()
    for frame in events:
        # processLocalBook's body without its crash: nonce check, then both sides.
        if frame["nonce"] != book["nonce"] + 1:
            raise RuntimeError("gap")
        book["bids"] = sortAndInsert(book["bids"], frame["bids"], bidsCompare)
        book["asks"] = sortAndInsert(book["asks"], frame["asks"], asksCompare)
        book["nonce"] = frame["nonce"]
    return time.perf_counter() - start, book


def main(levels: int = 100, count: int = 200_000, sdk_count: int = 20_000) -> None:
    snapshot, events = generate(levels, count)
    # The pre-generated input is not the system under test: keep the collector from rescanning it.
    gc.collect()
    gc.freeze()
    ours_s, sync = run_ours(snapshot, events)
    sdk_s, sdk_book = run_sdk(snapshot, events[:sdk_count])
    # Same result on the common prefix: the comparison is apples to apples.
    check_s, check = run_ours(snapshot, events[:sdk_count])
    assert [(Decimal(p), Decimal(s)) for p, s in sdk_book["bids"][:20]] == check.book.bids(20)
    del check_s
    ours_rate = count / ours_s
    sdk_rate = sdk_count / sdk_s
    print(f"book apply, {levels} levels/side, padded wire strings, 1-4 levels per event")
    print(f"  ours (parse + nonce check + apply): {ours_rate:>12,.0f} updates/s over {count:,} updates")
    print(f"  SDK sortAndInsert (baseline):       {sdk_rate:>12,.0f} updates/s over {sdk_count:,} updates")
    print(f"  ratio ours/SDK:                     {ours_rate / sdk_rate:>12.1f}x   (targets: >=200,000/s, >=20x)")
    print(f"  final book: {sync.book.depth_counts()} levels, best bid {sync.book.best_bid()}")


if __name__ == "__main__":
    main()
