"""Strict decimal parsing and Bitvavo-style formatting.

Money is Decimal end to end. Bitvavo sends every number as a string; we reject anything that
is not a finite decimal (NaN, Infinity, floats, booleans) so bad input never turns into a price.
"""

from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any

ZERO = Decimal(0)


class DecimalParseError(ValueError):
    """A value that should be a decimal string was not a finite decimal."""


def parse_decimal(value: Any, field: str = "value") -> Decimal:
    """Parse a Bitvavo decimal (a JSON string, or an int) into a finite Decimal."""
    if isinstance(value, bool) or value is None:
        raise DecimalParseError(f"{field} must be a decimal string, got {value!r}")
    if isinstance(value, float):
        # A float has already lost precision; Bitvavo never sends them.
        raise DecimalParseError(f"{field} must be a decimal string, got float {value!r}")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, (str, int)):
        try:
            result = Decimal(value)
        except (InvalidOperation, ValueError):
            raise DecimalParseError(f"{field} is not a decimal: {value!r}") from None
    else:
        raise DecimalParseError(f"{field} must be a decimal string, got {type(value).__name__}")
    if not result.is_finite():
        raise DecimalParseError(f"{field} must be finite, got {value!r}")
    return result


def parse_non_negative(value: Any, field: str = "value") -> Decimal:
    result = parse_decimal(value, field)
    if result < 0:
        raise DecimalParseError(f"{field} must not be negative, got {value!r}")
    return result


def parse_positive(value: Any, field: str = "value") -> Decimal:
    result = parse_decimal(value, field)
    if result <= 0:
        raise DecimalParseError(f"{field} must be positive, got {value!r}")
    return result


def format_decimal(value: Decimal) -> str:
    """Minimal plain string as Bitvavo's REST API writes it: no exponent, no trailing zeros."""
    text = str(value)
    if "E" in text:  # str() chose scientific notation (tiny or huge values): take the slow exact path
        text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def format_padded(value: Decimal, places: int) -> str:
    """Fixed number of decimals, as in WebSocket book deltas ("75516.00", "0.00100000")."""
    return format(value.quantize(Decimal(1).scaleb(-places)), "f")


def floor_to(value: Decimal, places: int) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_FLOOR)


def ceil_to(value: Decimal, places: int) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_CEILING)


def decimal_places(value: Decimal) -> int:
    """Number of significant decimals after the point ("1.50" -> 1, "100" -> 0)."""
    exponent = value.normalize().as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)
