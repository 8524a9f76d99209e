import pytest

from trading.exchange.errors import RateLimitBannedError
from trading.exchange.governor import RateBudgetExhaustedError, RateGovernor


class Clock:
    def __init__(self, now: int = 1_700_000_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def test_books_weight_until_headroom_then_reports_the_wait() -> None:
    clock = Clock(60_000 * 1000 + 10_000)
    governor = RateGovernor(100, critical_headroom=10, clock_ms=clock)
    for _ in range(18):
        assert governor.try_reserve(5) == 0.0
    assert governor.try_reserve(5) == pytest.approx(50.0)   # 90 used, window ends 50 s later
    assert governor.try_reserve(5, critical=True) == 0.0    # cancels may use the headroom
    clock.now += 50_000
    assert governor.try_reserve(5) == 0.0                   # new minute, counter reset
    assert governor.state().used == 5


def test_server_headers_win_when_more_conservative() -> None:
    clock = Clock(1_000)
    governor = RateGovernor(1000, critical_headroom=0, clock_ms=clock)
    governor.try_reserve(1)
    governor.observe_headers(remaining=10, reset_at_ms=30_000)
    assert governor.state().remaining == 10
    assert governor.try_reserve(11) == pytest.approx(29.0)
    governor.observe_headers(remaining=900, reset_at_ms=None)   # never loosens our own count
    assert governor.state().remaining == 10


def test_ban_blocks_every_call_until_it_ends() -> None:
    clock = Clock(1_000)
    governor = RateGovernor(1000, clock_ms=clock, max_wait_s=5)
    governor.observe_ban(61_000)
    assert governor.try_reserve(1, critical=True) == pytest.approx(60.0)
    with pytest.raises(RateLimitBannedError) as info:
        governor.acquire(1)
    assert info.value.banned_until_ms == 61_000
    clock.now = 61_000
    assert governor.try_reserve(1) == 0.0


def test_acquire_refuses_to_wait_longer_than_allowed() -> None:
    clock = Clock(0)
    governor = RateGovernor(10, critical_headroom=0, clock_ms=clock, max_wait_s=1)
    governor.acquire(10)
    with pytest.raises(RateBudgetExhaustedError):
        governor.acquire(1)


def test_headers_from_the_previous_minute_do_not_charge_the_new_one() -> None:
    clock = Clock(119_990)
    governor = RateGovernor(1000, critical_headroom=0, clock_ms=clock)
    governor.try_reserve(1)
    clock.now = 120_010                                  # the reply arrives after the minute turned
    governor.observe_headers(remaining=40, reset_at_ms=120_000)
    assert governor.state().used == 0
    governor.observe_headers(remaining=990, reset_at_ms=180_000)
    assert governor.state().used == 10


def test_one_budget_per_key_or_per_host() -> None:
    from pydantic import SecretStr

    from trading.exchange.governor import budget_identity, shared_governor
    from trading.exchange.rest import BitvavoRest

    assert budget_identity("https://api.bitvavo.com/v2") == budget_identity("https://api.bitvavo.com/v2/")
    key = SecretStr("k" * 64)
    assert budget_identity("https://api.bitvavo.com/v2", key).startswith("key:")
    assert "k" * 16 not in budget_identity("https://api.bitvavo.com/v2", key)       # never the key itself
    # The ingest runner and an unsigned REST client towards the same host share one budget.
    rest = BitvavoRest("http://127.0.0.1:9/v2")
    assert rest.governor is shared_governor(budget_identity("http://127.0.0.1:9/v2"))
