"""Every endpoint answers odd parameter values with a BitvavoError code, never an unexpected exception."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from trading.exchange.errors import BitvavoError
from trading.sim.api import ENDPOINTS, SimApi
from trading.sim.config import SimConfig
from trading.sim.exchange import SimExchange

ODD_VALUES: list[Any] = [None, [1], {"a": 1}, 1.5, True, -1, 0, 10**30, "", "x", "NaN", "-Infinity", "1e400",
                         "0.000000000000000000001", "BTC-EUR", str(uuid.uuid4())]
NAMES = ["market", "symbol", "depth", "limit", "start", "end", "tradeIdFrom", "tradeIdTo", "orderIdFrom",
         "orderIdTo", "interval", "side", "orderType", "amount", "amountQuote", "amountRemaining", "price",
         "timeInForce", "postOnly", "selfTradePrevention", "clientOrderId", "orderId", "operatorId",
         "responseRequired", "disableMarketProtection", "triggerAmount", "base", "quote", "codGroupId",
         "expiryAfterSeconds"]
ORDER: dict[str, Any] = {"market": "BTC-EUR", "side": "buy", "orderType": "limit", "amount": "0.01",
                         "price": "1000", "operatorId": 1}


async def test_odd_values_never_escape_as_unexpected_exceptions() -> None:
    exchange = SimExchange(SimConfig(markets=("BTC-EUR", "WMTX-EUR"),
                                     balances={"EUR": Decimal(10**6), "BTC": Decimal(10)}))
    api = SimApi(exchange)
    order_id = api.create_order(dict(ORDER))["orderId"]
    bases = {"privateCreateOrder": ORDER,
             "privateUpdateOrder": {"market": "BTC-EUR", "orderId": order_id, "operatorId": 1, "price": "1001"}}
    other = {"market": "BTC-EUR", "orderId": order_id, "operatorId": 1, "interval": "1m", "expiryAfterSeconds": 0}
    codes: set[int] = set()
    for endpoint in ENDPOINTS.values():
        base = bases.get(endpoint.action, other)
        for name in NAMES:
            for value in ODD_VALUES:
                params = {k: v for k, v in {**base, name: value}.items() if v is not None}
                try:
                    endpoint.handler(api, params)
                except BitvavoError as error:
                    assert error.error_code != 101 and error.http_status is not None, (endpoint.action, name, value)
                    codes.add(error.error_code)
    assert {201, 203, 205}.issubset(codes)
