"""Bitvavo error codes (spec §3) and the typed exceptions our client raises.

One table serves both sides: the simulator builds its error replies from it, and the client
maps a reply back to an exception class carrying `error_code`.
"""

import re
from typing import Any

# code -> (HTTP status, default message). Messages follow the live API's wording where known.
ERROR_SPECS: dict[int, tuple[int, str]] = {
    101: (500, "Unknown error. Operation may or may not have succeeded."),
    102: (400, "Invalid JSON."),
    105: (429, "Your IP or API key has been banned for not respecting the rate limit."),
    107: (503, "The matching engine is overloaded. Please wait 500ms and resubmit your order."),
    108: (503, "The matching engine could not process your order in time."),
    109: (503, "The matching engine did not respond in time. Operation may or may not have succeeded."),
    110: (400, "Invalid endpoint. Please check url and HTTP method."),
    111: (503, "The matching engine is unavailable. Please try again later."),
    112: (429, "Too many messages per second on this connection."),
    200: (400, "Path parameters are not supported for this endpoint."),
    201: (400, "Body parameters are not supported for this endpoint."),
    202: (400, "This parameter is not allowed for this orderType."),
    203: (400, "Missing or incompatible parameters in your request."),
    204: (400, "Parameter not supported."),
    205: (400, "Invalid parameter value."),
    206: (400, "Use either amount or amountQuote, not both."),
    210: (400, "Amount exceeds the maximum allowed amount."),
    211: (400, "Price exceeds the maximum allowed price."),
    212: (400, "Amount is below the minimum allowed amount."),
    213: (400, "Price is too low."),
    214: (400, "Price has too many significant digits."),
    215: (400, "Price has more than 15 decimal places."),
    216: (400, "You do not have sufficient balance to complete this operation."),
    217: (400, "Minimum order size in quote currency is 5 EUR or 0.001 BTC."),
    219: (400, "This market is no longer listed on Bitvavo."),
    220: (400, "The clientOrderId is already in use by an open order."),
    231: (400, "The timeInForce parameter must be GTC when the market is paused."),
    232: (400, "Your order update does not change anything."),
    233: (400, "The order is not active. Only orders with status new or partiallyFilled can be updated."),
    234: (400, "Market orders cannot be updated."),
    235: (400, "You can only have 100 open orders in each market."),
    236: (400, "You can only update amount or amountRemaining or amountQuote, not multiple."),
    239: (400, "You cannot switch between amount and amountQuote in an update."),
    240: (404, "No order found. Please be aware that simultaneously updating the same order may return this error."),
    300: (403, "Authentication is required for this endpoint."),
    301: (403, "API Key must be of length 64."),
    302: (403, "Timestamp is invalid. This must be a timestamp in ms."),
    303: (403, "Window must be between 100 and 60000 ms."),
    304: (403, "Request was not received within acceptable window (default 10000 ms)."),
    305: (403, "No active API key found."),
    306: (403, "No active API key found. Please ensure that you have confirmed the API key by e-mail."),
    307: (403, "This key does not allow access from this IP."),
    308: (403, "The signature length is invalid (HMAC-SHA256 should return a 64 length hexadecimal string)."),
    309: (403, "The signature is invalid."),
    310: (403, "This key does not allow trading actions."),
    311: (403, "This key does not allow showing account information."),
    312: (403, "This key does not allow withdrawal of funds."),
    317: (403, "This account is locked. Please contact support."),
    415: (404, "Invalid action. Please check the request."),
    422: (400, "The price is not a multiple of the tick size."),
    423: (400, "The market is halted."),
    424: (400, "The market is in cancel-only mode."),
    425: (400, "The market is in an auction phase."),
    426: (400, "The market is in auction matching."),
    429: (400, "Too many decimals for this market."),
    431: (409, "Market data is not available for this market in its current state."),
}

_BAN_UNTIL = re.compile(r" at (\d+)")


class BitvavoError(Exception):
    """An error reply from Bitvavo (or the simulator): `error_code` is Bitvavo's errorCode."""

    def __init__(self, error_code: int, message: str, http_status: int | None = None,
                 action: str | None = None) -> None:
        super().__init__(f"[{error_code}] {message}")
        self.error_code = error_code
        self.message = message
        self.http_status = http_status
        self.action = action


class OutcomeUncertainError(BitvavoError):
    """The exchange may or may not have executed the request (101, 109, 5xx, timeouts).

    Never resend an order on this error: look it up by `client_order_id` (set on order calls).
    """

    client_order_id: str | None = None
    market: str | None = None


class ExchangeUnavailableError(BitvavoError):
    """Overloaded or unavailable (107, 108, 111): the request was not processed."""


class RateLimitBannedError(BitvavoError):
    """errorCode 105. `banned_until_ms` is when the ban ends (parsed from the message)."""

    def __init__(self, error_code: int, message: str, http_status: int | None = None,
                 action: str | None = None) -> None:
        super().__init__(error_code, message, http_status, action)
        match = _BAN_UNTIL.search(message)
        self.banned_until_ms: int | None = int(match.group(1)) if match else None


class TooManyMessagesError(BitvavoError):
    """errorCode 112: too many WebSocket messages per second."""


class InvalidRequestError(BitvavoError):
    """A parameter error (102, 200-239, 422, 429): fix the request, do not retry."""


class InsufficientBalanceError(InvalidRequestError):
    """errorCode 216."""


class OrderNotFoundError(BitvavoError):
    """errorCode 240."""


class AuthenticationError(BitvavoError):
    """errorCodes 300-317: missing, wrong or insufficient credentials."""


class MarketUnavailableError(BitvavoError):
    """errorCodes 219, 423-426, 431: the market does not accept this now."""


class UnknownActionError(BitvavoError):
    """errorCode 415: unknown WebSocket action."""


def exception_class_for(code: int) -> type[BitvavoError]:
    if code == 105:
        return RateLimitBannedError
    if code == 112:
        return TooManyMessagesError
    if code == 216:
        return InsufficientBalanceError
    if code == 240:
        return OrderNotFoundError
    if code in (101, 109):
        return OutcomeUncertainError
    if code in (107, 108, 111):
        return ExchangeUnavailableError
    if 300 <= code <= 317:
        return AuthenticationError
    if code in (219, 423, 424, 425, 426, 431):
        return MarketUnavailableError
    if code == 415:
        return UnknownActionError
    if code == 102 or 200 <= code <= 239 or code in (422, 429):
        return InvalidRequestError
    return BitvavoError


def error_from_payload(payload: dict[str, Any], http_status: int | None = None) -> BitvavoError:
    """Build the typed exception for a `{"errorCode": n, "error": "..."}` reply."""
    raw_code = payload.get("errorCode")
    code = raw_code if isinstance(raw_code, int) and not isinstance(raw_code, bool) else 101
    message = str(payload.get("error", "")) or ERROR_SPECS.get(code, (0, "unknown error"))[1]
    action = payload.get("action")
    return exception_class_for(code)(code, message, http_status, action if isinstance(action, str) else None)


def error_body(code: int, message: str | None = None) -> dict[str, Any]:
    """The JSON body the exchange sends for `code` (used by the simulator)."""
    return {"errorCode": code, "error": message or ERROR_SPECS[code][1]}


def http_status_for(code: int) -> int:
    return ERROR_SPECS.get(code, (400, ""))[0]


def ban_message(until_ms: int) -> str:
    """Exact format the SDKs parse: the ms after ' at ' up to the '.'."""
    return ("Your IP or API key has been banned for not respecting the rate limit. "
            f"The ban expires at {until_ms}.")
