import pytest

from tests.fixtures import wire_captures
from trading.exchange.errors import (
    ERROR_SPECS,
    AuthenticationError,
    BitvavoError,
    ExchangeUnavailableError,
    InsufficientBalanceError,
    InvalidRequestError,
    MarketUnavailableError,
    OrderNotFoundError,
    OutcomeUncertainError,
    RateLimitBannedError,
    UnknownActionError,
    ban_message,
    error_body,
    error_from_payload,
)


@pytest.mark.parametrize(("code", "cls"), [
    (101, OutcomeUncertainError), (109, OutcomeUncertainError), (107, ExchangeUnavailableError),
    (111, ExchangeUnavailableError), (105, RateLimitBannedError), (205, InvalidRequestError),
    (216, InsufficientBalanceError), (240, OrderNotFoundError), (300, AuthenticationError),
    (309, AuthenticationError), (415, UnknownActionError), (431, MarketUnavailableError),
    (102, InvalidRequestError), (999, BitvavoError),
])
def test_codes_map_to_typed_exceptions(code: int, cls: type[BitvavoError]) -> None:
    error = error_from_payload({"errorCode": code, "error": "x"}, 400)
    assert type(error) is cls
    assert error.error_code == code


def test_ban_time_is_parsed_like_the_sdks_do() -> None:
    error = error_from_payload(error_body(105, ban_message(1695379680000)), 429)
    assert isinstance(error, RateLimitBannedError)
    assert error.banned_until_ms == 1695379680000
    # The exact message format the official SDK splits on.
    assert int(error.message.split(" at ")[1].split(".")[0]) == 1695379680000


def test_every_recorded_error_frame_maps_to_its_code() -> None:
    seen = 0
    for capture in wire_captures():
        payload = capture.get("frame") or capture.get("body")
        if isinstance(payload, dict) and "errorCode" in payload:
            error = error_from_payload(payload, capture.get("status"))
            assert error.error_code == payload["errorCode"]
            assert error.message == payload["error"]
            if capture.get("status"):
                assert ERROR_SPECS[error.error_code][0] == capture["status"]
            seen += 1
    assert seen >= 15


def test_garbage_error_payload_still_gives_an_exception() -> None:
    error = error_from_payload({"errorCode": "nope"})
    assert error.error_code == 101
