from decimal import Decimal

import pytest

from tests.fixtures import wire_captures
from trading.book import BookSync, OrderBook, SyncState, UpdateOutcome
from trading.exchange.models import BookSnapshot, PayloadError

D = Decimal


def snap(nonce: int, bids: list[tuple[str, str]], asks: list[tuple[str, str]], market: str = "BTC-EUR"
         ) -> BookSnapshot:
    return BookSnapshot.from_wire({"market": market, "nonce": nonce, "bids": [list(b) for b in bids],
                                   "asks": [list(a) for a in asks]})


def upd(nonce: int, bids: tuple[tuple[str, str], ...] = (), asks: tuple[tuple[str, str], ...] = (),
        market: str = "BTC-EUR") -> dict[str, object]:
    return {"event": "book", "market": market, "nonce": nonce,
            "bids": [list(b) for b in bids], "asks": [list(a) for a in asks]}


def test_padded_and_unpadded_prices_are_one_level() -> None:
    book = OrderBook("BTC-EUR")
    book.load(snap(1, [("75516", "1")], [("75520", "1")]))
    book.apply_wire(upd(2, bids=(("75516.00", "0.00058294"),)))
    assert book.bids() == [(D("75516"), D("0.00058294"))]
    book.apply_wire(upd(3, bids=(("75516.0000", "0"),)))
    assert book.bids() == []


def test_levels_stay_sorted_and_best_is_cheap() -> None:
    book = OrderBook("BTC-EUR")
    book.load(snap(1, [("100", "1"), ("99", "1")], [("101", "1"), ("102", "1")]))
    book.apply_wire(upd(2, bids=(("98.5", "2"), ("100.5", "3")), asks=(("101", "0"), ("103", "1"))))
    assert [p for p, _ in book.bids()] == [D("100.5"), D(100), D(99), D("98.5")]
    assert [p for p, _ in book.asks()] == [D(102), D(103)]
    assert book.best_bid() == (D("100.5"), D(3))
    assert book.best_ask() == (D(102), D(1))
    assert book.bids(2) == book.bids()[:2]
    assert not book.is_crossed()


def test_snapshot_drops_buffered_events_at_or_below_its_nonce() -> None:
    sync = BookSync("BTC-EUR")
    for nonce in (8, 9, 10, 11, 12):
        assert sync.on_update(upd(nonce, bids=(("100", str(nonce)),))) is UpdateOutcome.BUFFERED
    assert sync.on_snapshot(snap(10, [("100", "10")], [("101", "1")]))
    assert sync.state is SyncState.LIVE
    assert sync.book.nonce == 12 and sync.book.best_bid() == (D(100), D(12))
    assert sync.on_update(upd(13)) is UpdateOutcome.APPLIED


def test_snapshot_older_than_the_buffer_needs_another_snapshot() -> None:
    sync = BookSync("BTC-EUR")
    sync.on_update(upd(20))
    assert not sync.on_snapshot(snap(15, [("1", "1")], [("2", "1")]))
    assert sync.state is SyncState.AWAITING_SNAPSHOT
    assert sync.on_snapshot(snap(19, [("1", "1")], [("2", "1")]))
    assert sync.book.nonce == 20


@pytest.mark.parametrize("bad_nonce", [7, 5, 1, 0], ids=["skip", "duplicate", "reset", "reset-to-zero"])
def test_any_nonce_discontinuity_is_a_gap(bad_nonce: int) -> None:
    sync = BookSync("BTC-EUR")
    sync.on_snapshot(snap(5, [("1", "1")], [("2", "1")]))
    outcome = sync.on_update(upd(bad_nonce))
    assert outcome is UpdateOutcome.GAP
    assert sync.state is SyncState.AWAITING_SNAPSHOT
    assert sync.resyncs == 1 and sync.last_gap is not None and sync.last_gap.expected_nonce == 6


def test_recorded_deltas_apply_to_the_recorded_snapshot_shape() -> None:
    frames = [c["frame"] for c in wire_captures() if isinstance(c.get("frame"), dict)]
    snapshot = next(f["response"] for f in frames if f.get("action") == "getBook" and "response" in f)
    delta = next(f for f in frames if f.get("event") == "book" and f["market"] == "BTC-EUR")
    book = OrderBook("BTC-EUR")
    book.load(BookSnapshot.from_wire(snapshot))
    book.apply_wire(delta)
    # "74968.00" -> "0" deletes nothing that is absent; "75516.00" adds a level that sorts below the best bid.
    assert book.size_at("buy", D("75516")) == D("0.00058294")
    assert book.size_at("buy", D("74966")) == D("0.001")
    assert book.best_bid() == (D("75521"), D("0.05641959"))
    assert [p for p, _ in book.bids()] == sorted((p for p, _ in book.bids()), reverse=True)


@pytest.mark.parametrize("levels", [
    [["NaN", "1"]], [["100", "-1"]], [[100.5, "1"]], [["100", "Infinity"]], [["100", "1.2.3"]],
    [["100"]], ["oops"], [["", "1"]], [["100", None]], [["0", "1"]],
])
def test_malformed_event_is_rejected_and_forces_a_resync(levels: list[object]) -> None:
    sync = BookSync("BTC-EUR")
    sync.on_snapshot(snap(5, [("1", "1")], [("2", "1")]))
    with pytest.raises(PayloadError):
        sync.on_update({"event": "book", "market": "BTC-EUR", "nonce": 6, "bids": levels, "asks": []})
    assert sync.state is SyncState.AWAITING_SNAPSHOT and sync.malformed == 1
    assert sync.on_snapshot(snap(6, [("1", "2")], [("2", "1")]))
    assert sync.on_update(upd(7)) is UpdateOutcome.APPLIED


@pytest.mark.parametrize("nonce", ["7", None, 7.0, True])
def test_non_integer_nonce_is_rejected(nonce: object) -> None:
    sync = BookSync("BTC-EUR")
    with pytest.raises(PayloadError):
        sync.on_update({"event": "book", "market": "BTC-EUR", "nonce": nonce, "bids": [], "asks": []})


def test_malformed_event_in_the_buffer_makes_the_snapshot_unusable() -> None:
    sync = BookSync("BTC-EUR")
    sync.on_update(upd(6, bids=(("NaN", "1"),)))
    sync.on_update(upd(7))
    assert not sync.on_snapshot(snap(5, [("1", "1")], [("2", "1")]))
    assert sync.malformed == 1
    assert sync.on_snapshot(snap(7, [("1", "1")], [("2", "1")]))


def test_replayed_events_are_reported_with_the_book_they_produced() -> None:
    sync = BookSync("BTC-EUR")
    sync.on_update(upd(11, bids=(("100", "2"),)))
    sync.on_update(upd(12, bids=(("101", "1"),)))
    tops: list[tuple[int, object]] = []
    assert sync.on_snapshot(snap(10, [("100", "1")], [("102", "1")]),
                            lambda frame: tops.append((frame["nonce"], sync.book.best_bid())))
    assert tops == [(11, (D(100), D(2))), (12, (D(101), D(1)))]


@pytest.mark.parametrize("side", [{}, 0, "", False, {"100": "1"}, "100"])
def test_a_side_that_is_not_a_list_is_rejected_even_when_empty(side: object) -> None:
    sync = BookSync("BTC-EUR")
    sync.on_snapshot(snap(5, [("1", "1")], [("2", "1")]))
    with pytest.raises(PayloadError, match="asks must be a list"):
        sync.on_update({"event": "book", "market": "BTC-EUR", "nonce": 6, "bids": [], "asks": side})
    assert sync.state is SyncState.AWAITING_SNAPSHOT


def test_an_absent_or_null_side_is_no_change() -> None:
    sync = BookSync("BTC-EUR")
    sync.on_snapshot(snap(5, [("1", "1")], [("2", "1")]))
    assert sync.on_update({"event": "book", "market": "BTC-EUR", "nonce": 6, "bids": None}) is UpdateOutcome.APPLIED
    assert sync.book.bids() == [(D(1), D(1))] and sync.book.asks() == [(D(2), D(1))]
