import json

import pytest

from trading.exchange.signing import compact_body, signature, signatures_equal, websocket_signature

# Test vectors from spec §1.2 (secret "bitvavo").
VECTORS = [
    ("POST", "/v2/order", '{"market":"BTC-EUR","side":"buy","price":"5000","amount":"1.23","orderType":"limit"}',
     "44d022723a20973a18f7ee97398b9fdd405d2d019c8d39e24b8cc0dcb39ca016"),
    ("GET", "/v2/time", "", "3a87fd70063567070f4c6c3865337ec9a17fd080178e6ec963dc07bbd45645d1"),
    ("GET", "/v2/order?market=BTC-EUR&orderId=ff403e21-e270-4584-bc9e-9c4b18461465", "",
     "f1a650464c7261dc92b4b28f8320852152b322ed88180c580a5f0d268f553fb2"),
]


@pytest.mark.parametrize(("method", "path", "body", "expected"), VECTORS)
def test_spec_vectors(method: str, path: str, body: str, expected: str) -> None:
    assert signature("bitvavo", 1548172481125, method, path, body) == expected


def test_websocket_vector() -> None:
    assert websocket_signature("bitvavo", 1548175200641) == (
        "653fc0505431c63a043273da4bd2f0927eae83948d796084f313e5d1131b0d6f")


def test_compact_body_matches_what_the_sdk_signs() -> None:
    body = {"market": "BTC-EUR", "side": "buy", "price": "5000", "amount": "1.23", "orderType": "limit"}
    assert compact_body(body) == json.dumps(body, separators=(",", ":"))
    assert compact_body({}) == "" and compact_body(None) == ""


def test_signature_comparison_is_case_insensitive_on_the_given_side() -> None:
    sig = signature("s", 1, "GET", "/v2/time")
    assert signatures_equal(sig, sig.upper())
    assert not signatures_equal(sig, "0" * 64)
