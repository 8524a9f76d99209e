"""The paper venue refuses what Bitvavo refuses: market orders by amount below minOrderInQuoteAsset.

The shared engine values such an order at the best opposite price (docs/simulator.md); the venue
reports the engine's refusal as a `rejected` report carrying the exchange's error text.
"""

from __future__ import annotations

from decimal import Decimal

from tests.unit.test_paper_venue import _intent, _snapshot, _venue
from trading.execution.paper import PAPER_ACCOUNT

D = Decimal


async def test_market_orders_by_amount_below_the_minimum_notional_are_rejected() -> None:
    venue = await _venue(balances={"EUR": D("100"), "BTC": D("1")})
    _snapshot(venue, 1, bids=[("99", "1")], asks=[("100", "1")])
    # A sell is valued at the best bid (99), a buy at the best ask (100).
    for side, amount in (("sell", "0.0001"), ("sell", "0.0505"), ("buy", "0.0499")):  # 0.0099 / 4.9995 / 4.99 EUR
        [small] = await venue.submit(_intent(side=side, order_type="market", amount=amount))
        assert small.status == "rejected" and small.order_id == "" and small.fills == ()
        assert small.reason == "[217] Minimum order size in quote currency is 5 EUR."
    balances = venue.engine.balances(PAPER_ACCOUNT)
    assert (balances["EUR"].available, balances["BTC"].available) == (D("100"), D("1"))
    assert venue.stats.rejected == 3 and venue.stats.orders_placed == 0

    [sold] = await venue.submit(_intent(side="sell", order_type="market", amount="0.0506"))  # 5.0094 EUR
    [bought] = await venue.submit(_intent(side="buy", order_type="market", amount="0.05"))  # 5.00 EUR
    assert sold.status == bought.status == "filled"
    assert (sold.filled_amount_quote, bought.filled_amount_quote) == (D("5.0094"), D("5"))
