"""The PnL ledger against a ledger computed by hand: average cost and FIFO, spot
inventory (a sell beyond the position is an anomaly, never a short), fees, marks, days, two modes.

Every expected number below was worked out on paper from the scripted fills (the working is in
the comments); none of it comes from the code under test.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trading.orders import ExecutionReport, FillRecord
from trading.pnl import Anomaly, ApplyOutcome, Ledger, LedgerError, Ledgers

D = Decimal
_fill_numbers = itertools.count(1)


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def fill(amount: str, price: str, fee: str, fee_currency: str, at: str, fill_id: str | None = None) -> FillRecord:
    fill_id = f"f{next(_fill_numbers)}" if fill_id is None else fill_id
    return FillRecord(fill_id=fill_id, ts=ms(at), amount=D(amount), price=D(price), fee=D(fee),
                      fee_currency=fee_currency, taker=True)


def report(market: str, side: str, *fills: FillRecord) -> ExecutionReport:
    amount = sum((f.amount for f in fills), D(0))
    return ExecutionReport(intent_id="i-" + "-".join(f.fill_id for f in fills), order_id="o", market=market,
                           side=side, status="filled",  # type: ignore[arg-type]
                           filled_amount=amount, filled_amount_quote=sum((f.amount * f.price for f in fills), D(0)),
                           fee=sum((f.fee for f in fills), D(0)), fee_currency="EUR", dry_run=True,
                           ts=max(f.ts for f in fills), fills=fills)


DAY1 = "2026-09-22T"
DAY2 = "2026-09-23T"

# BTC-EUR, step by step (position, average cost, FIFO lots, realised avg / FIFO, fees in EUR):
# F1 buy 0.5 @ 30000, fee 15 EUR
#    pos 0.5, avg 30000, lots [0.5@30000]; R 0 / 0; fees 15
# F2 buy 0.25 @ 33000, fee 0.0005 BTC
#    trade: pos 0.75, avg (0.5*30000 + 0.25*33000)/0.75 = 23250/0.75 = 31000, lots [0.5@30000, 0.25@33000]
#    base fee = a disposal of 0.0005 BTC @ 33000: R_avg 0.0005*(33000-31000) = 1, R_fifo 0.0005*(33000-30000) = 1.5
#    pos 0.7495, lots [0.4995@30000, 0.25@33000]; fee 0.0005*33000 = 16.5 EUR; fees 31.5
# F3 sell 0.4 @ 32000, fee -0.8 EUR (maker rebate), the last fill of day 1 (23:59:59.999)
#    R_avg += 0.4*(32000-31000) = 400 -> 401; R_fifo += 0.4*(32000-30000) = 800 -> 801.5
#    pos 0.3495, avg 31000, lots [0.0995@30000, 0.25@33000]; fees 30.7
#    day 1: realised 401 - fees 30.7 = 370.3
# F4 one order, two fills at 29000 (00:00:00.000 of day 2): sell 0.3 (fee 9) + sell 0.1495 (fee 5.5), more than held
#    first fill 0.3: R_avg += 0.3*(29000-31000) = -600 -> -199; FIFO 0.0995*(-1000) = -99.5, 0.2005*(-4000) = -802
#    -> R_fifo -100; pos 0.0495, lots [0.0495@33000]
#    second fill: only the 0.0495 held is booked: R_avg += 0.0495*(-2000) = -99 -> -298; FIFO 0.0495*(-4000) = -198
#    -> -298; pos 0, avg 0, no lots. The other 0.1 is an anomaly (never a short). fees 30.7 + 14.5 = 45.2
# F5 sell 0.1 @ 28000, fee 7: nothing held, so all of it is an anomaly; fees 52.2; unbooked 0.2
# F6 buy 0.15 @ 27000, fee 4.05: pos 0.15, avg 27000, lots [0.15@27000]; fees 56.25
# ETH-EUR: E1 buy 2 @ 1500 fee 3; E2 buy 1 @ 1800 fee 0: pos 3, avg (3000+1800)/3 = 1600, lots [2@1500, 1@1800]
# Day 2: realised -600 - 99 = -699, fees 9 + 5.5 + 7 + 4.05 + 3 = 28.55 -> realized_today -727.55
SCRIPT = [
    report("BTC-EUR", "buy", fill("0.5", "30000", "15", "EUR", DAY1 + "10:00:00")),
    report("BTC-EUR", "buy", fill("0.25", "33000", "0.0005", "BTC", DAY1 + "12:00:00")),
    report("BTC-EUR", "sell", fill("0.4", "32000", "-0.8", "EUR", DAY1 + "23:59:59.999")),
    report("BTC-EUR", "sell", fill("0.3", "29000", "9", "EUR", DAY2 + "00:00:00"),
           fill("0.1495", "29000", "5.5", "EUR", DAY2 + "00:00:00")),
    report("BTC-EUR", "sell", fill("0.1", "28000", "7", "EUR", DAY2 + "01:00:00")),
    report("BTC-EUR", "buy", fill("0.15", "27000", "4.05", "EUR", DAY2 + "02:00:00")),
    report("ETH-EUR", "buy", fill("2", "1500", "3", "EUR", DAY2 + "03:00:00")),
    report("ETH-EUR", "buy", fill("1", "1800", "0", "EUR", DAY2 + "04:00:00")),
]

# Marks: BTC at 27500 (a book mid); ETH has no book yet, so its last fill (1800) stands in.
# BTC: unrealised 0.15*(27500-27000) = 75, FIFO the same (one lot); exposure 0.15*27500 = 4125
# ETH: unrealised 3*(1800-1600) = 600; FIFO 2*(1800-1500) + 1*(1800-1800) = 600; exposure 3*1800 = 5400
# Totals: realised -298, FIFO -298, fees 56.25 + 3 = 59.25, unrealised 675 (FIFO 675), exposure 9525,
#         equity -298 - 59.25 + 675 = 317.75
EXPECTED_DAY2 = {
    "realized": "-298", "realized_fifo": "-298", "fees": "59.25", "unrealized": "675", "unrealized_fifo": "675",
    "exposure": "9525", "equity": "317.75", "realized_today": "-727.55", "day": "2026-09-23",
    "updated_ts": str(ms(DAY2 + "05:00:00")), "fills": "9", "anomalies": "2",
    "BTC-EUR:position": "0.15", "BTC-EUR:avg_cost": "27000", "BTC-EUR:realized": "-298",
    "BTC-EUR:realized_fifo": "-298", "BTC-EUR:fees": "56.25", "BTC-EUR:unrealized": "75",
    "BTC-EUR:unrealized_fifo": "75", "BTC-EUR:exposure": "4125", "BTC-EUR:mark": "27500",
    "BTC-EUR:mark_source": "mid", "BTC-EUR:unbooked": "0.2",
    "ETH-EUR:position": "3", "ETH-EUR:avg_cost": "1600", "ETH-EUR:realized": "0", "ETH-EUR:realized_fifo": "0",
    "ETH-EUR:fees": "3", "ETH-EUR:unrealized": "600", "ETH-EUR:unrealized_fifo": "600", "ETH-EUR:exposure": "5400",
    "ETH-EUR:mark": "1800", "ETH-EUR:mark_source": "last_fill", "ETH-EUR:unbooked": "0",
}


def scripted_ledger() -> Ledger:
    ledger = Ledger()
    for item in SCRIPT:
        ledger.apply(item)
    return ledger


def test_scripted_fills_match_the_hand_computed_ledger() -> None:
    ledger = scripted_ledger()
    ledger.mark("BTC-EUR", D("27500"))
    assert ledger.snapshot(ms(DAY2 + "05:00:00")) == EXPECTED_DAY2


def test_a_mark_moves_unrealised_and_exposure_only() -> None:
    ledger = scripted_ledger()
    ledger.mark("BTC-EUR", D("27500"))
    ledger.mark("ETH-EUR", D("1700"))
    # ETH at 1700: unrealised 3*(1700-1600) = 300; FIFO 2*200 + 1*(-100) = 300; exposure 5100
    # totals: unrealised 75 + 300 = 375, FIFO 75 + 300 = 375, exposure 4125 + 5100 = 9225,
    #         equity -298 - 59.25 + 375 = 17.75
    snapshot = ledger.snapshot(ms(DAY2 + "05:00:00"))
    changed = {key: value for key, value in snapshot.items() if EXPECTED_DAY2[key] != value}
    assert changed == {"unrealized": "375", "unrealized_fifo": "375", "exposure": "9225", "equity": "17.75",
                       "ETH-EUR:unrealized": "300", "ETH-EUR:unrealized_fifo": "300", "ETH-EUR:exposure": "5100",
                       "ETH-EUR:mark": "1700", "ETH-EUR:mark_source": "mid"}


def test_realized_today_restarts_at_midnight_utc() -> None:
    ledger = Ledger()
    for item in SCRIPT[:3]:
        ledger.apply(item)
    last_ms_of_day1 = ms(DAY1 + "23:59:59.999")
    snapshot = ledger.snapshot(last_ms_of_day1)
    assert (snapshot["day"], snapshot["realized_today"], snapshot["realized"]) == ("2026-09-22", "370.3", "401")
    # Midnight: no fill yet today, so today's figure starts from zero while the running totals stay.
    snapshot = ledger.snapshot(last_ms_of_day1 + 1)
    assert (snapshot["day"], snapshot["realized_today"], snapshot["realized"]) == ("2026-09-23", "0", "401")
    for item in SCRIPT[3:]:
        ledger.apply(item)
    assert ledger.snapshot(ms(DAY2 + "23:59:59"))["realized_today"] == "-727.55"
    assert ledger.snapshot(ms("2026-09-24T00:00:00"))["realized_today"] == "0"


def test_a_repeated_fill_is_booked_once() -> None:
    ledger = scripted_ledger()
    before = ledger.snapshot(ms(DAY2 + "05:00:00"))
    assert ledger.apply(SCRIPT[2]) == ApplyOutcome(applied=0, duplicates=1)
    # A later report that repeats one fill of F4 and brings a new one: only the new one counts.
    # The new fill sells 0.05 of the 0.15 held at avg 27000, at 27000: pos 0.1, nothing realised
    again = report("BTC-EUR", "sell", SCRIPT[3].fills[1], fill("0.05", "27000", "0", "EUR", DAY2 + "06:00:00"))
    assert ledger.apply(again) == ApplyOutcome(applied=1, duplicates=1)
    after = ledger.snapshot(ms(DAY2 + "05:00:00"))
    assert (after["BTC-EUR:position"], after["BTC-EUR:avg_cost"], after["fills"]) == ("0.1", "27000", "10")
    assert after["realized"] == before["realized"] and after["fees"] == before["fees"]
    assert ledger.duplicates_skipped == 2


@pytest.mark.parametrize(("bad", "reason"), [
    (report("BTC-EUR", "buy", fill("0.1", "100", "0", "EUR", DAY2 + "00:00:00"),
            fill("-0.1", "100", "0", "EUR", DAY2 + "00:00:00")), "amount must be positive"),
    (report("BTC-EUR", "buy", fill("0", "100", "0", "EUR", DAY2 + "00:00:00")), "amount must be positive"),
    (report("BTC-EUR", "buy", fill("0.1", "0", "0", "EUR", DAY2 + "00:00:00")), "price must be positive"),
    (report("BTC-USDC", "buy", fill("0.1", "100", "0", "USDC", DAY2 + "00:00:00")), "EUR markets only"),
    (report("BTC-EUR", "buy", fill("0.1", "100", "0.01", "BNB", DAY2 + "00:00:00")), "neither EUR nor BTC"),
    (report("BTC-EUR", "buy", fill("0.1", "100", "0", "EUR", DAY2 + "00:00:00", fill_id="")), "without fill_id"),
])
def test_a_bad_report_is_refused_whole(bad: ExecutionReport, reason: str) -> None:
    ledger = scripted_ledger()
    before = ledger.snapshot(ms(DAY2 + "05:00:00"))
    with pytest.raises(LedgerError, match=reason):
        ledger.apply(bad)
    assert ledger.snapshot(ms(DAY2 + "05:00:00")) == before  # not even the good first fill was booked
    assert ledger == scripted_ledger()


def test_a_mark_must_be_a_positive_price() -> None:
    with pytest.raises(LedgerError, match="positive price"):
        Ledger().mark("BTC-EUR", D("0"))


def test_ledgers_compare_on_bookings_not_marks() -> None:
    marked = scripted_ledger()
    marked.mark("BTC-EUR", D("1"))
    assert marked == scripted_ledger()
    shorter = Ledger()
    for item in SCRIPT[:-1]:
        shorter.apply(item)
    assert shorter != scripted_ledger()


trades = st.lists(st.tuples(st.sampled_from(["buy", "sell"]), st.integers(1, 9), st.integers(1, 500)),
                  min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(trades, st.integers(1, 500))
def test_average_cost_and_fifo_agree_on_total_pnl(script: list[tuple[str, int, int]], mark: int) -> None:
    """Realised + unrealised is the same under both methods (they only split it differently),
    and the FIFO lots always add up to the position."""
    ledger = Ledger()
    for side, amount, price in script:
        ledger.apply(report("BTC-EUR", side, fill(str(amount), str(price), "0", "EUR", DAY2 + "00:00:00")))
        account = ledger.accounts["BTC-EUR"]
        assert account.position >= 0  # spot: never short, whatever the fills say
        assert sum((lot.amount for lot in account.lots), D(0)) == account.position
    ledger.mark("BTC-EUR", D(mark))
    snap = ledger.snapshot(ms(DAY2 + "01:00:00"))
    average = D(snap["realized"]) + D(snap["unrealized"])
    fifo = D(snap["realized_fifo"]) + D(snap["unrealized_fifo"])
    assert abs(average - fifo) < D("1e-18")  # the average price is a rounded quotient


# -- spot inventory: a sell never takes a position below zero -------------------------------------

def test_a_sell_with_nothing_held_books_nothing_but_its_fee_and_is_an_anomaly() -> None:
    ledger = Ledger()
    sale = report("BTC-EUR", "sell", fill("0.01", "30000", "0.75", "EUR", DAY2 + "00:00:00", fill_id="s1"))
    outcome = ledger.apply(sale)
    assert outcome == ApplyOutcome(applied=1, duplicates=0,
                                   anomalies=(Anomaly("s1", "BTC-EUR", ms(DAY2 + "00:00:00"), D("0.01"), D("30000")),))
    snap = ledger.snapshot(ms(DAY2 + "01:00:00"))
    # No short, no unrealised PnL on one; the fee was paid, so it counts.
    assert (snap["BTC-EUR:position"], snap["BTC-EUR:unrealized"], snap["BTC-EUR:exposure"]) == ("0", "0", "0")
    assert (snap["realized"], snap["fees"], snap["anomalies"], snap["BTC-EUR:unbooked"]) == ("0", "0.75", "1", "0.01")
    assert ledger.apply(sale).anomalies == ()  # a repeated fill is a duplicate, not a second anomaly


def test_a_sell_larger_than_the_position_realises_the_position_and_reports_the_rest() -> None:
    ledger = Ledger()
    ledger.apply(report("BTC-EUR", "buy", fill("0.3", "20000", "0", "EUR", DAY2 + "00:00:00")))
    outcome = ledger.apply(report("BTC-EUR", "sell", fill("0.5", "21000", "0", "EUR", DAY2 + "00:01:00",
                                                          fill_id="big")))
    assert [(a.fill_id, a.unbooked) for a in outcome.anomalies] == [("big", D("0.2"))]
    snap = ledger.snapshot(ms(DAY2 + "01:00:00"))
    # Only the 0.3 held is realised: 0.3 * (21000 - 20000) = 300, both methods.
    assert (snap["BTC-EUR:position"], snap["realized"], snap["realized_fifo"]) == ("0", "300", "300")
    assert snap["BTC-EUR:avg_cost"] == "0"


def test_a_sell_after_a_partially_filled_buy_sells_only_what_filled() -> None:
    ledger = Ledger()
    # A buy of 0.4 filled 0.1 of it (the rest cancelled): the position is 0.1, not 0.4.
    ledger.apply(report("ETH-EUR", "buy", fill("0.1", "2000", "0", "EUR", DAY2 + "00:00:00")))
    outcome = ledger.apply(report("ETH-EUR", "sell", fill("0.4", "2100", "0", "EUR", DAY2 + "00:00:01",
                                                          fill_id="e-sell")))
    assert [a.unbooked for a in outcome.anomalies] == [D("0.3")]
    snap = ledger.snapshot(ms(DAY2 + "01:00:00"))
    assert (snap["ETH-EUR:position"], snap["realized"]) == ("0", "10")  # 0.1 * (2100 - 2000)


def test_a_base_fee_beyond_the_position_is_an_anomaly_too() -> None:
    ledger = Ledger()
    ledger.apply(report("BTC-EUR", "buy", fill("0.1", "20000", "0", "EUR", DAY2 + "00:00:00")))
    # Selling all 0.1 with a 0.001 BTC fee: the fee's base is not held any more.
    outcome = ledger.apply(report("BTC-EUR", "sell", fill("0.1", "20000", "0.001", "BTC", DAY2 + "00:00:01",
                                                          fill_id="fee")))
    assert [a.unbooked for a in outcome.anomalies] == [D("0.001")]
    assert ledger.accounts["BTC-EUR"].position == 0


def test_paper_and_live_fills_go_to_two_books() -> None:
    ledgers = Ledgers()
    paper_buy = report("BTC-EUR", "buy", fill("0.5", "30000", "0", "EUR", DAY2 + "00:00:00"))
    live_sell = replace(report("BTC-EUR", "sell", fill("0.2", "31000", "0", "EUR", DAY2 + "00:00:01",
                                                       fill_id="live-1")), dry_run=False)
    ledgers.apply(paper_buy)
    outcome = ledgers.apply(live_sell)
    # The paper position is no inventory for a live sell: the live book holds nothing.
    assert [a.unbooked for a in outcome.anomalies] == [D("0.2")]
    assert ledgers.paper.accounts["BTC-EUR"].position == D("0.5")
    assert ledgers.live.accounts["BTC-EUR"].position == 0
    assert ledgers.of(True) is ledgers.paper and ledgers.of(False) is ledgers.live
