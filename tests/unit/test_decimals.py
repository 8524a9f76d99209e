from decimal import Decimal

import pytest

from trading.decimals import (
    DecimalParseError,
    ceil_to,
    decimal_places,
    floor_to,
    format_decimal,
    format_padded,
    parse_decimal,
    parse_non_negative,
    parse_positive,
)


@pytest.mark.parametrize("bad", ["NaN", "nan", "Infinity", "-inf", "abc", "", "1e", None, True, 1.5, [], {}])
def test_rejects_non_finite_and_wrong_types(bad: object) -> None:
    with pytest.raises(DecimalParseError):
        parse_decimal(bad, "price")


def test_error_names_the_field() -> None:
    with pytest.raises(DecimalParseError, match="amount"):
        parse_decimal("NaN", "amount")


def test_parses_padded_and_unpadded_to_equal_values() -> None:
    assert parse_decimal("75516.00") == parse_decimal("75516") == Decimal(75516)
    assert hash(parse_decimal("0.00100000")) == hash(parse_decimal("0.001"))


def test_sign_checks() -> None:
    assert parse_non_negative("0") == 0
    with pytest.raises(DecimalParseError):
        parse_non_negative("-0.1")
    with pytest.raises(DecimalParseError):
        parse_positive("0")


def test_formatting() -> None:
    assert format_decimal(Decimal("75516.00")) == "75516"
    assert format_decimal(Decimal("0.02448938")) == "0.02448938"
    assert format_decimal(Decimal("1E+3")) == "1000"
    assert format_decimal(Decimal("-0.0")) == "0"
    assert format_padded(Decimal("75516"), 2) == "75516.00"
    assert format_padded(Decimal("0.001"), 8) == "0.00100000"


def test_rounding_helpers() -> None:
    assert floor_to(Decimal("6.89448938") * (1 - Decimal("0.0025")), 2) == Decimal("6.87")
    assert ceil_to(Decimal("6.8976") * (1 + Decimal("0.0025")), 2) == Decimal("6.92")
    assert decimal_places(Decimal("1.50")) == 1
    assert decimal_places(Decimal("100")) == 0


@pytest.mark.parametrize(("value", "text"), [
    ("75516.00", "75516"), ("0.02448938", "0.02448938"), ("1E+3", "1000"), ("-0.0", "0"), ("0", "0"),
    ("0E-8", "0"), ("1E-7", "0.0000001"), ("-12.5000", "-12.5"), ("100", "100"), ("1.23456789E+12", "1234567890000"),
])
def test_format_decimal_is_minimal_and_never_scientific(value: str, text: str) -> None:
    assert format_decimal(Decimal(value)) == text
    assert Decimal(format_decimal(Decimal(value))) == Decimal(value)
