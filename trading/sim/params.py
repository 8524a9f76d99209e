"""Request parameter parsing shared by REST (query strings, JSON bodies) and WebSocket frames.

Values arrive as strings (query), or as JSON values (body, frames). Every failure is a
BitvavoError with the spec's code and wording ("<name> parameter <value> is invalid.",
"<name> parameter is required."), never an exception that would become a 500.
"""

from __future__ import annotations

import re
import uuid
from decimal import Decimal
from typing import Any

from trading.decimals import DecimalParseError, parse_decimal
from trading.exchange.errors import BitvavoError, error_body, exception_class_for, http_status_for
from trading.matching import MAGNITUDE_LIMIT_EXPONENT

Params = dict[str, Any]
_MARKET_SHAPE = re.compile(r"^[A-Z0-9]+-[A-Z0-9]+$")
_INT64_MAX = 2**63 - 1


def api_error(code: int, message: str | None = None) -> BitvavoError:
    return exception_class_for(code)(code, error_body(code, message)["error"], http_status_for(code))


def required(name: str) -> BitvavoError:
    return api_error(203, f"{name} parameter is required.")


def invalid(name: str, value: Any = None) -> BitvavoError:
    if value is None or isinstance(value, (dict, list)):
        return api_error(205, f"{name} parameter is invalid.")
    return api_error(205, f"{name} parameter {value} is invalid.")


def invalid_market(value: Any) -> BitvavoError:
    """Bitvavo names a well-formed unknown market in the message, but not a malformed one."""
    if isinstance(value, str) and _MARKET_SHAPE.match(value):
        return invalid("market", value)
    return invalid("market")


def text(params: Params, name: str, *, choices: tuple[str, ...] | None = None) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or (choices is not None and value not in choices):
        raise invalid(name, value)
    return value


def integer(params: Params, name: str, *, low: int | None = None, high: int | None = None) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        raise invalid(name, value)
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,19}", value):
        number = int(value)
    else:
        raise invalid(name, value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise invalid(name, value)
    return number


def decimal(params: Params, name: str) -> Decimal | None:
    """A positive finite decimal (strings; integers tolerated); NaN/Infinity/floats/bools are refused."""
    value = params.get(name)
    if value is None:
        return None
    try:
        number = parse_decimal(value, name)
    except DecimalParseError:
        raise invalid(name, value if isinstance(value, (str, int)) else None) from None
    if number <= 0:
        raise invalid(name, value)
    if number.adjusted() >= MAGNITUDE_LIMIT_EXPONENT:
        raise api_error(211 if name == "price" else 210)
    return number


def boolean(params: Params, name: str) -> bool | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in ("true", "false"):
        return value == "true"
    raise invalid(name, value)


def operator_id(params: Params) -> int:
    """Mandatory on order create/update/cancel since 2025-06-01 (spec §5.1)."""
    value = integer(params, "operatorId", low=1, high=_INT64_MAX)
    if value is None:
        raise required("operatorId")
    return value


def client_order_id(params: Params) -> str | None:
    value = params.get("clientOrderId")
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid("clientOrderId")
    try:
        uuid.UUID(value)
    except ValueError:
        raise invalid("clientOrderId", value) from None
    return value


def order_reference(params: Params) -> tuple[str | None, str | None]:
    """orderId or clientOrderId (one is required)."""
    order_id = params.get("orderId")
    if order_id is not None and not isinstance(order_id, str):
        raise invalid("orderId")
    coid = client_order_id(params)
    if order_id is None and coid is None:
        raise required("orderId")
    return order_id, coid


def reject_unknown(params: Params, allowed: frozenset[str]) -> None:
    for name in params:
        if name not in allowed:
            raise api_error(201, f"{name} parameter is not supported.")
