"""Our REST client against the simulator over real HTTP: typed errors, retries, governor, order ids."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable
from decimal import Decimal

import pytest
from pydantic import SecretStr
from python_bitvavo_api.bitvavo import Bitvavo

from tests.integration.conftest import SimHandle
from trading.exchange import rest as rest_module
from trading.exchange.clock_sync import ClockSyncError
from trading.exchange.errors import (
    AuthenticationError,
    InsufficientBalanceError,
    InvalidRequestError,
    MarketUnavailableError,
    OrderNotFoundError,
    OutcomeUncertainError,
    RateLimitBannedError,
)
from trading.exchange.governor import RateBudgetExhaustedError, RateGovernor
from trading.exchange.rest import BitvavoRest


def client(sim: SimHandle, *, secret: str | None = None, timeout_s: float = 5.0,
           governor: RateGovernor | None = None, operator_id: int | None = 4242) -> BitvavoRest:
    return BitvavoRest(sim.rest_url, api_key=SecretStr(sim.api_key), api_secret=SecretStr(secret or sim.api_secret),
                       operator_id=operator_id, governor=governor or RateGovernor(), timeout_s=timeout_s,
                       retry_base_s=0.05)


def below_best_bid(rest: BitvavoRest, market: str) -> Decimal:
    """A price 3% under the best bid on the tick grid: it rests, whatever the generator does meanwhile."""
    snapshot = rest.book(market, depth=1)
    tick = Decimal(rest.markets(market)["tickSize"])
    return (snapshot.bids[0][0] * Decimal("0.97") / tick).to_integral_value() * tick


def test_public_and_private_calls_parse_into_models(sim: SimHandle) -> None:
    rest = client(sim)
    assert abs(rest.sync_clock()) < 5_000
    snapshot = rest.book("BTC-EUR", depth=5)
    assert snapshot.market == "BTC-EUR" and len(snapshot.bids) == 5 and snapshot.bids[0][0] < snapshot.asks[0][0]
    assert rest.candles("BTC-EUR", "1m", limit=5) is not None
    assert {row["symbol"] for row in rest.balance()} >= {"EUR", "BTC"}


def test_order_lifecycle_carries_operator_and_client_order_id(sim: SimHandle) -> None:
    rest = client(sim)
    price = below_best_bid(rest, "BTC-EUR")
    order = rest.place_order("BTC-EUR", "buy", "limit", amount=Decimal("0.001"), price=price)
    assert order.status == "new" and order.operator_id == 4242
    assert order.client_order_id is not None and uuid.UUID(order.client_order_id)
    found = rest.get_order("BTC-EUR", client_order_id=order.client_order_id)
    assert found.order_id == order.order_id
    assert any(o.order_id == order.order_id for o in rest.open_orders("BTC-EUR"))
    rest.cancel_order("BTC-EUR", client_order_id=order.client_order_id)
    assert rest.get_order("BTC-EUR", order_id=order.order_id).status == "canceled"


def test_errors_are_typed(sim: SimHandle) -> None:
    rest = client(sim)
    with pytest.raises(InvalidRequestError) as bad_market:
        rest.book("NOPE-EUR")
    assert bad_market.value.error_code == 205 and bad_market.value.http_status == 400
    with pytest.raises(MarketUnavailableError) as halted:
        rest.book("WMTX-EUR")
    assert halted.value.error_code == 431
    with pytest.raises(InsufficientBalanceError):
        rest.place_order("BTC-EUR", "buy", "limit", amount=Decimal("100"), price=below_best_bid(rest, "BTC-EUR"))
    with pytest.raises(InvalidRequestError) as negative:
        rest.place_order("BTC-EUR", "buy", "limit", amount=Decimal("-1"), price=Decimal("100"))
    assert negative.value.error_code == 205
    with pytest.raises(OrderNotFoundError):
        rest.get_order("BTC-EUR", client_order_id=str(uuid.uuid4()))
    with pytest.raises(AuthenticationError) as wrong_secret:
        client(sim, secret="wrong").balance()
    assert wrong_secret.value.error_code == 309
    with pytest.raises(ValueError, match="operatorId"):
        client(sim, operator_id=None).place_order("BTC-EUR", "buy", "market", amount=Decimal("0.001"))
    with pytest.raises(ValueError, match="UUID"):
        rest.place_order("BTC-EUR", "buy", "market", amount=Decimal("0.001"), client_order_id="not-a-uuid")


def test_reads_are_retried_through_transient_failures(sim: SimHandle) -> None:
    rest = client(sim)
    sim.fail_next(2, error_code=111)
    assert rest.markets("BTC-EUR")["market"] == "BTC-EUR"
    assert sim.stats()["faults"]["pending_rest_faults"] == []


def test_uncertain_order_submit_is_not_resent_and_is_found_by_client_order_id(sim: SimHandle) -> None:
    rest = client(sim, timeout_s=1.0)
    order_id = str(uuid.uuid4())
    price = below_best_bid(rest, "ETH-EUR")
    sim.hang_next(1, seconds=3.0, execute=True)        # the exchange takes the order, the reply never comes
    with pytest.raises(OutcomeUncertainError):
        rest.place_order("ETH-EUR", "buy", "limit", amount=Decimal("0.01"), price=price, client_order_id=order_id)
    found = rest.get_order("ETH-EUR", client_order_id=order_id)
    assert found.status == "new"
    assert [o.client_order_id for o in rest.open_orders("ETH-EUR")].count(order_id) == 1
    sim.fail_next(1, error_code=101, execute=True)     # 5xx after the order was accepted; the id is ours
    with pytest.raises(OutcomeUncertainError) as uncertain:
        rest.place_order("ETH-EUR", "buy", "limit", amount=Decimal("0.01"), price=price)
    second = uncertain.value.client_order_id
    assert second is not None and uncertain.value.market == "ETH-EUR"
    assert [o.client_order_id for o in rest.open_orders("ETH-EUR")].count(second) == 1
    rest.cancel_orders("ETH-EUR")


def test_a_reply_cut_off_mid_body_is_an_uncertain_outcome() -> None:
    # A server that starts a 200 reply and hangs up halfway: the order may exist.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_once() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                               b'{"orderId":"')
    server = threading.Thread(target=serve_once, daemon=True)
    server.start()
    try:
        rest = BitvavoRest(f"http://127.0.0.1:{port}/v2", api_key=SecretStr("k" * 64), api_secret=SecretStr("s"),
                           operator_id=1, governor=RateGovernor(), timeout_s=5)
        with pytest.raises(OutcomeUncertainError) as info:
            rest.place_order("BTC-EUR", "buy", "market", amount=Decimal("0.001"))
        assert info.value.client_order_id is not None and uuid.UUID(info.value.client_order_id)
    finally:
        server.join(timeout=5)
        listener.close()


def test_governor_follows_the_server_headers(sim: SimHandle) -> None:
    sim.reset_rate_limits()
    governor = RateGovernor(critical_headroom=0)
    rest = client(sim, governor=governor)
    rest.balance()          # weight 5
    rest.ticker24h()        # weight 25 without a market
    assert governor.state().used >= 30
    assert governor.state().remaining <= 970


def test_governor_stops_short_of_the_exchange_limit(sim_factory: Callable[..., SimHandle]) -> None:
    sim = sim_factory("--rate-limit", "40", "--ban-seconds", "120", markets="BTC-EUR")
    # Our budget assumes 1000; the server's remaining-header must make us stop before a ban.
    governor = RateGovernor(1000, critical_headroom=0, max_wait_s=0.5)
    rest = client(sim, governor=governor)
    with pytest.raises(RateBudgetExhaustedError):
        for _ in range(20):
            rest.balance()   # weight 5
    assert governor.state().banned_until_ms == 0
    budgets = sim.stats()["rate_limit"]["budgets"].values()
    assert budgets and all(b["banned_until_ms"] == 0 for b in budgets)


def test_ban_caused_elsewhere_is_honoured_locally(sim_factory: Callable[..., SimHandle]) -> None:
    sim = sim_factory("--rate-limit", "40", "--ban-seconds", "120", markets="BTC-EUR")
    # Another process on the same key (the official SDK, which tracks nothing) exhausts the budget.
    other = Bitvavo({"APIKEY": sim.api_key, "APISECRET": sim.api_secret, "RESTURL": sim.rest_url})
    for _ in range(20):
        reply = other.balance()
        if isinstance(reply, dict) and reply.get("errorCode") == 105:
            break
    else:
        pytest.fail("the exchange never banned the key")
    rest = client(sim, governor=RateGovernor(1000, critical_headroom=0, max_wait_s=1))
    with pytest.raises(RateLimitBannedError) as banned:
        rest.time()
    assert banned.value.banned_until_ms is not None
    assert rest.governor.state().banned_until_ms == banned.value.banned_until_ms
    before = sim.stats()["rate_limit"]
    with pytest.raises(RateLimitBannedError):
        rest.markets()       # refused locally: the ban has two minutes to run
    assert sim.stats()["rate_limit"] == before


def test_withdrawal_right_is_probed_without_moving_funds(sim_factory: Callable[..., SimHandle]) -> None:
    sim = sim_factory(markets="BTC-EUR")
    rest = client(sim)
    try:
        assert rest.key_can_withdraw() is False  # the simulator's default key is trade-only
        balances_before = rest.balance()
        sim.control(api_key_permissions=["view", "trade", "withdraw"])
        assert rest.key_can_withdraw() is True
        assert rest.balance() == balances_before
    finally:
        rest.close()


# -- the clock offset (docs/exchange-client.md) ------------------------------------------------------

def test_hung_and_slow_time_calls_at_start_never_poison_the_offset(sim: SimHandle) -> None:
    rest = client(sim, timeout_s=5.0)
    # Two /time calls hang (past the 2 s sample timeout) and one answers 1.5 s late: none can justify
    # an offset. The old single retried call would have measured about -2.5 s here.
    sim.hang_next(2, seconds=3.0, execute=True)
    sim.delay_next(1, seconds=1.5)
    offset = rest.sync_clock()
    assert abs(offset) < 200 and rest.clock_rtt_ms is not None and rest.clock_rtt_ms < 1_000
    assert {row["symbol"] for row in rest.balance()} >= {"EUR"}  # signed calls go through


def test_with_no_trustworthy_sample_the_previous_offset_stays(sim: SimHandle) -> None:
    rest = client(sim)
    good = rest.sync_clock()
    sim.delay_next(3, seconds=1.2)
    with pytest.raises(ClockSyncError, match="no /time sample within 1000 ms"):
        rest.sync_clock(samples=3)
    assert rest.clock_offset_ms == good


def test_a_304_re_measures_the_clock_and_the_refused_call_is_sent_once_more(sim: SimHandle) -> None:
    rest = client(sim)
    rest.sync_clock()
    rest.clock_offset_ms = 20_000  # as if a bad measurement had slipped through: every signed call gets 304
    sim.hang_next(2, seconds=3.0)  # and the re-measure meets hung /time calls mid-run
    price = below_best_bid(rest, "BTC-EUR")
    order = rest.place_order("BTC-EUR", "buy", "limit", amount=Decimal("0.001"), price=price)
    assert order.status == "new" and abs(rest.clock_offset_ms) < 200
    assert [o.order_id for o in rest.open_orders("BTC-EUR")].count(order.order_id) == 1  # sent once, not twice
    rest.cancel_order("BTC-EUR", order_id=order.order_id)


def test_the_offset_is_re_measured_periodically(sim: SimHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    rest = client(sim)
    rest.sync_clock()
    rest.clock_offset_ms = 3_000  # drifted, but still inside the 10 s window: no 304 to tell
    monkeypatch.setattr(rest_module, "CLOCK_RESYNC_S", 0.0)
    rest.balance()
    assert abs(rest.clock_offset_ms) < 200
