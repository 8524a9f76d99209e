"""The exchange's endpoints (spec §4), shared by REST and the WebSocket actions (§7.1).

Each handler takes the request parameters (REST: query or JSON body, with the path's market
injected; WebSocket: the frame's fields) and returns the REST-shaped body, or raises
BitvavoError. Transport concerns (auth, rate limit, faults, framing) live in rest.py / ws.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from trading.decimals import format_decimal, format_padded
from trading.exchange.intervals import CANDLE_INTERVALS
from trading.matching import Fill, Order, OrderRequest, OrderUpdate, SelfTradePrevention, TimeInForce
from trading.sim import params as P
from trading.sim.exchange import USER, SimExchange
from trading.sim.markets import asset_rows, market_wire

DAY_MS = 86_400_000
_SIDES = ("buy", "sell")
_TIME_IN_FORCE: dict[str, TimeInForce] = {"GTC": "GTC", "IOC": "IOC", "FOK": "FOK"}
_STP: dict[str, SelfTradePrevention] = {
    "decrementAndCancel": "decrementAndCancel", "cancelOldest": "cancelOldest",
    "cancelNewest": "cancelNewest", "cancelBoth": "cancelBoth"}
_TRIGGERS = ("triggerAmount", "triggerType", "triggerReference")
_CREATE_FIELDS = frozenset({
    "market", "side", "orderType", "amount", "amountQuote", "price", "timeInForce", "postOnly",
    "selfTradePrevention", "clientOrderId", "operatorId", "responseRequired", "disableMarketProtection",
    *_TRIGGERS})
_UPDATE_FIELDS = frozenset({
    "market", "orderId", "clientOrderId", "operatorId", "amount", "amountRemaining", "amountQuote", "price",
    "timeInForce", "selfTradePrevention", "postOnly", "responseRequired", "disableMarketProtection",
    *_TRIGGERS})

T = TypeVar("T")


@dataclass(frozen=True)
class Endpoint:
    method: str
    template: str
    action: str  # the WebSocket action, also named in 431 messages
    permission: str | None  # None: public; 'view' or 'trade': private
    handler: Callable[[SimApi, P.Params], Any]


def _single_or_list(rows: list[dict[str, Any]], filtered: bool) -> Any:
    """A filtered list endpoint returns the one object, not a one-element list (spec §0)."""
    return rows[0] if filtered else rows


def _slice_by_id(items: Iterable[T], key: Callable[[T], str], id_from: str | None, id_to: str | None) -> list[T]:
    """Items (newest first) from `id_to` back to `id_from`, both inclusive."""
    selected: list[T] = []
    reached = id_to is None
    for item in items:
        if not reached:
            if key(item) != id_to:
                continue
            reached = True
        selected.append(item)
        if key(item) == id_from:
            break
    return selected


def _window(params: P.Params) -> tuple[int | None, int | None]:
    start = P.integer(params, "start", low=0)
    end = P.integer(params, "end", low=0)
    if start is not None and end is not None and (end < start or end - start > DAY_MS):
        raise P.invalid("end", end)
    return start, end


def fill_wire(fill: Fill, order: Order | None) -> dict[str, Any]:
    """GET /trades row (own fills)."""
    row: dict[str, Any] = {"id": fill.fill_id, "orderId": fill.order_id}
    if fill.client_order_id is not None:
        row["clientOrderId"] = fill.client_order_id
    row.update({"timestamp": fill.timestamp, "market": fill.market, "side": fill.side,
                "amount": format_decimal(fill.amount), "price": format_decimal(fill.price), "taker": fill.taker,
                "fee": format_decimal(fill.fee), "feeCurrency": fill.fee_currency, "settled": True})
    if order is not None and order.operator_id is not None:
        row["operatorId"] = order.operator_id
    return row


class SimApi:
    def __init__(self, exchange: SimExchange) -> None:
        self.exchange = exchange
        self.engine = exchange.engine
        self._deadman: asyncio.TimerHandle | None = None

    # helpers
    def _market(self, params: P.Params, *, action: str | None = None) -> str:
        """The required `market`; with `action`, market data must be available (431 when halted)."""
        value = params.get("market")
        if value is None:
            raise P.required("market")
        if not isinstance(value, str) or value not in self.exchange.specs:
            raise P.invalid_market(value)
        if action is not None:
            status = self.engine.rules(value).status
            if status == "halted":
                raise P.api_error(431, f"{action} is not available for {value} in state {status.upper()}")
        return value

    def _optional_market(self, params: P.Params) -> str | None:
        return None if params.get("market") is None else self._market(params)

    # public
    def time(self, params: P.Params) -> dict[str, Any]:
        ns = self.exchange.clock_ns()
        return {"time": ns // 1_000_000, "timeNs": ns}

    def markets(self, params: P.Params) -> Any:
        wanted = params.get("market")
        if wanted is not None and (not isinstance(wanted, str) or wanted not in self.exchange.specs):
            raise P.invalid("market")  # the live API names no value here (wire capture)
        rows = [market_wire(spec, self.engine.rules(market)) for market, spec in self.exchange.specs.items()
                if wanted is None or market == wanted]
        return _single_or_list(rows, wanted is not None)

    def assets(self, params: P.Params) -> Any:
        symbol = params.get("symbol")
        rows = asset_rows(list(self.exchange.specs.values()))
        if symbol is None:
            return rows
        for row in rows:
            if row["symbol"] == symbol:
                return row
        raise P.invalid("symbol", symbol if isinstance(symbol, str) else None)

    def book(self, params: P.Params) -> dict[str, Any]:
        market = self._market(params, action="getBook")
        depth = P.integer(params, "depth", low=1, high=1000)
        return self.exchange.book_snapshot(market, 1000 if depth is None else depth)

    def public_trades(self, params: P.Params) -> list[dict[str, Any]]:
        market = self._market(params, action="getTrades")
        limit = P.integer(params, "limit", low=1, high=1000)
        start, end = _window(params)
        return self.exchange.trades[market].query(
            limit=500 if limit is None else limit, start=start, end=end,
            id_from=P.text(params, "tradeIdFrom"), id_to=P.text(params, "tradeIdTo"))

    def candles(self, params: P.Params) -> list[list[Any]]:
        market = self._market(params, action="getCandles")
        interval = params.get("interval")
        if interval is None:
            raise P.required("interval")
        if interval not in CANDLE_INTERVALS:
            raise P.invalid("interval", interval if isinstance(interval, str) else None)
        limit = P.integer(params, "limit", low=1, high=1440)
        start = P.integer(params, "start", low=0)
        end = P.integer(params, "end", low=0)
        return self.exchange.candles[market][interval].query(1440 if limit is None else limit, start, end)

    def ticker_price(self, params: P.Params) -> Any:
        wanted = self._optional_market(params)
        prices = {m: self.exchange.last_price(m) for m in self._markets(wanted)}
        rows = [{"market": m, "price": None if p is None else format_decimal(p)} for m, p in prices.items()]
        return _single_or_list(rows, wanted is not None)

    def ticker_book(self, params: P.Params) -> Any:
        wanted = self._optional_market(params)
        rows = []
        for market in self._markets(wanted):
            bid, ask = self.engine.best_bid(market), self.engine.best_ask(market)
            rows.append({"market": market,
                         "bid": format_decimal(bid[0]) if bid else None,
                         "bidSize": format_decimal(bid[1]) if bid else None,
                         "ask": format_decimal(ask[0]) if ask else None,
                         "askSize": format_decimal(ask[1]) if ask else None})
        return _single_or_list(rows, wanted is not None)

    def ticker_24h(self, params: P.Params) -> Any:
        wanted = self._optional_market(params)
        now = self.exchange.clock_ms()
        rows = [self.exchange.ticker24h_row(market, now) for market in self._markets(wanted)]
        return _single_or_list(rows, wanted is not None)

    def _markets(self, wanted: str | None) -> list[str]:
        return [wanted] if wanted is not None else list(self.exchange.specs)

    # orders
    def create_order(self, params: P.Params) -> dict[str, Any]:
        P.reject_unknown(params, _CREATE_FIELDS)
        market = self._market(params)
        side = P.text(params, "side", choices=_SIDES)
        if side is None:
            raise P.required("side")
        order_type = params.get("orderType")
        if order_type is None:
            raise P.required("orderType")
        if order_type not in ("market", "limit"):
            raise P.invalid("orderType", order_type if isinstance(order_type, str) else None)
        operator = P.operator_id(params)
        for name in _TRIGGERS:
            if name in params:
                raise P.api_error(202, f"{name} parameter is not allowed for orderType {order_type}.")
        if P.boolean(params, "disableMarketProtection"):
            raise P.invalid("disableMarketProtection", "true")
        request = OrderRequest(
            market=market, side="buy" if side == "buy" else "sell",
            order_type="limit" if order_type == "limit" else "market",
            amount=P.decimal(params, "amount"), amount_quote=P.decimal(params, "amountQuote"),
            price=P.decimal(params, "price"),
            time_in_force=_TIME_IN_FORCE[P.text(params, "timeInForce", choices=tuple(_TIME_IN_FORCE)) or "GTC"],
            post_only=bool(P.boolean(params, "postOnly")),
            client_order_id=P.client_order_id(params), operator_id=operator,
            self_trade_prevention=_STP[P.text(params, "selfTradePrevention", choices=tuple(_STP))
                                       or "decrementAndCancel"])
        response_required = P.boolean(params, "responseRequired")
        result = self.engine.place(USER, request)
        self.exchange.apply_user([result])
        return self._order_reply(result.order, response_required)

    def update_order(self, params: P.Params) -> dict[str, Any]:
        P.reject_unknown(params, _UPDATE_FIELDS)
        market = self._market(params)
        order_id, coid = P.order_reference(params)
        operator = P.operator_id(params)
        if "amountQuote" in params:
            raise P.api_error(239)
        for name in _TRIGGERS:
            if name in params:
                raise P.api_error(202, f"{name} parameter is not allowed for orderType limit.")
        changes = OrderUpdate(
            amount=P.decimal(params, "amount"), amount_remaining=P.decimal(params, "amountRemaining"),
            price=P.decimal(params, "price"),
            time_in_force=_lookup(_TIME_IN_FORCE, P.text(params, "timeInForce", choices=tuple(_TIME_IN_FORCE))),
            post_only=P.boolean(params, "postOnly"),
            self_trade_prevention=_lookup(_STP, P.text(params, "selfTradePrevention", choices=tuple(_STP))),
            operator_id=operator)
        response_required = P.boolean(params, "responseRequired")
        result = self.engine.update(USER, market, changes, order_id=order_id, client_order_id=coid)
        self.exchange.apply_user([result])
        return self._order_reply(result.order, response_required)

    def cancel_order(self, params: P.Params) -> dict[str, Any]:
        market = self._market(params)
        order_id, coid = P.order_reference(params)
        operator = P.operator_id(params)
        result = self.engine.cancel(USER, market, order_id=order_id, client_order_id=coid)
        self.exchange.apply_user([result])
        reply: dict[str, Any] = {"orderId": result.order.order_id}
        if result.order.client_order_id is not None:
            reply["clientOrderId"] = result.order.client_order_id
        reply["operatorId"] = operator
        return reply

    def get_order(self, params: P.Params) -> dict[str, Any]:
        market = self._market(params)
        order_id, coid = P.order_reference(params)
        return self.engine.get_order(USER, market, order_id=order_id, client_order_id=coid).to_wire()

    def get_orders(self, params: P.Params) -> list[dict[str, Any]]:
        market = self._market(params)
        limit = P.integer(params, "limit", low=1, high=1000)
        start, end = _window(params)
        orders = _slice_by_id(self.engine.orders(USER, market), lambda o: o.order_id,
                              P.text(params, "orderIdFrom"), P.text(params, "orderIdTo"))
        rows = [o.to_wire() for o in orders
                if (start is None or o.created >= start) and (end is None or o.created < end)]
        return rows[:500 if limit is None else limit]

    def cancel_orders(self, params: P.Params) -> list[dict[str, Any]]:
        market = self._optional_market(params)
        operator = P.operator_id(params)
        results = self.engine.cancel_all(USER, market)
        self.exchange.apply_user(results)
        return [{"orderId": r.order.order_id, "operatorId": operator} for r in results]

    def orders_open(self, params: P.Params) -> list[dict[str, Any]]:
        market = self._optional_market(params)
        base = P.text(params, "base")
        orders = self.engine.open_orders(USER, market)
        if base is not None:
            orders = [o for o in orders if self.exchange.specs[o.market].base == base]
        return [o.to_wire() for o in orders]

    def own_trades(self, params: P.Params) -> list[dict[str, Any]]:
        market = self._market(params)
        limit = P.integer(params, "limit", low=1, high=1000)
        start, end = _window(params)
        fills = _slice_by_id(self.engine.account_fills(USER, market), lambda f: f.fill_id,
                             P.text(params, "tradeIdFrom"), P.text(params, "tradeIdTo"))
        orders = {o.order_id: o for o in self.engine.orders(USER, market)}
        rows = [fill_wire(f, orders.get(f.order_id)) for f in fills
                if (start is None or f.timestamp >= start) and (end is None or f.timestamp < end)]
        return rows[:500 if limit is None else limit]

    # account
    def account(self, params: P.Params) -> dict[str, Any]:
        fees = self.engine.fees(USER)
        return {"fees": {"taker": format_decimal(fees.taker), "maker": format_decimal(fees.maker),
                         "volume": self._volume()}}

    def withdrawal(self, params: P.Params) -> dict[str, Any]:
        """The simulator moves no funds: a key allowed to withdraw gets a parameter error, never a transfer."""
        for name in ("symbol", "amount", "address"):
            if params.get(name) is None:
                raise P.required(name)
        raise P.invalid("amount", params.get("amount"))

    def fees(self, params: P.Params) -> dict[str, Any]:
        self._optional_market(params)
        P.text(params, "quote", choices=("EUR", "USDC"))
        fees = self.engine.fees(USER)
        return {"tier": "0", "volume": self._volume(), "taker": format_decimal(fees.taker),
                "maker": format_decimal(fees.maker)}

    def _volume(self) -> str:
        return format_padded(self.exchange.user_volume, 2)

    def balance(self, params: P.Params) -> list[dict[str, Any]]:
        symbol = P.text(params, "symbol")
        return [{"symbol": b.symbol, "available": format_decimal(b.available), "inOrder": format_decimal(b.in_order)}
                for b in self.engine.balances(USER).values() if symbol is None or b.symbol == symbol]

    def cancel_orders_after(self, params: P.Params) -> dict[str, Any]:
        """Dead-man switch: cancel every open order unless called again within the expiry (0 disarms)."""
        group = P.integer(params, "codGroupId", low=0, high=2**63 - 1) or 1
        expiry = P.integer(params, "expiryAfterSeconds", low=0, high=86_400)
        if expiry is None:
            raise P.required("expiryAfterSeconds")
        if self._deadman is not None:
            self._deadman.cancel()
            self._deadman = None
        reply: dict[str, Any] = {"codGroupId": group, "expiryAfterSeconds": expiry}
        if expiry > 0:
            self._deadman = asyncio.get_running_loop().call_later(expiry, self._dead_man_fires)
            reply["expiresAt"] = self.exchange.clock_ms() + expiry * 1000
        return reply

    def _dead_man_fires(self) -> None:
        self._deadman = None
        self.exchange.apply_user(self.engine.cancel_all(USER))

    def _order_reply(self, order: Order, response_required: bool | None) -> dict[str, Any]:
        if response_required is False:
            short: dict[str, Any] = {"market": order.market, "orderId": order.order_id}
            if order.client_order_id is not None:
                short["clientOrderId"] = order.client_order_id
            short.update({"created": order.created, "updated": order.updated})
            return short
        return order.to_wire()


def _lookup(choices: dict[str, T], value: str | None) -> T | None:
    return None if value is None else choices[value]


ENDPOINTS: dict[tuple[str, str], Endpoint] = {(e.method, e.template): e for e in (
    Endpoint("GET", "/time", "getTime", None, SimApi.time),
    Endpoint("GET", "/markets", "getMarkets", None, SimApi.markets),
    Endpoint("GET", "/assets", "getAssets", None, SimApi.assets),
    Endpoint("GET", "/{market}/book", "getBook", None, SimApi.book),
    Endpoint("GET", "/{market}/trades", "getTrades", None, SimApi.public_trades),
    Endpoint("GET", "/{market}/candles", "getCandles", None, SimApi.candles),
    Endpoint("GET", "/ticker/price", "getTickerPrice", None, SimApi.ticker_price),
    Endpoint("GET", "/ticker/book", "getTickerBook", None, SimApi.ticker_book),
    Endpoint("GET", "/ticker/24h", "getTicker24h", None, SimApi.ticker_24h),
    Endpoint("POST", "/order", "privateCreateOrder", "trade", SimApi.create_order),
    Endpoint("GET", "/order", "privateGetOrder", "view", SimApi.get_order),
    Endpoint("PUT", "/order", "privateUpdateOrder", "trade", SimApi.update_order),
    Endpoint("DELETE", "/order", "privateCancelOrder", "trade", SimApi.cancel_order),
    Endpoint("GET", "/orders", "privateGetOrders", "view", SimApi.get_orders),
    Endpoint("DELETE", "/orders", "privateCancelOrders", "trade", SimApi.cancel_orders),
    Endpoint("GET", "/ordersOpen", "privateGetOrdersOpen", "view", SimApi.orders_open),
    Endpoint("GET", "/trades", "privateGetTrades", "view", SimApi.own_trades),
    Endpoint("GET", "/account", "privateGetAccount", "view", SimApi.account),
    Endpoint("GET", "/account/fees", "privateGetFees", "view", SimApi.fees),
    Endpoint("POST", "/withdrawal", "privateWithdrawAssets", "withdraw", SimApi.withdrawal),
    Endpoint("GET", "/balance", "privateGetBalance", "view", SimApi.balance),
    Endpoint("POST", "/cancelOrdersAfter", "privateCancelOrdersAfter", "trade", SimApi.cancel_orders_after),
)}
ACTIONS: dict[str, Endpoint] = {e.action: e for e in ENDPOINTS.values()}
