"""Universe selection deployment (`universe-selection`): decides `trading:universe` on a schedule.

The work is `trading.universe.run_selection`; this flow checks that its run is not stale, builds
the config from its parameters, and publishes the decision as a table artifact
(`universe-selection`) with every market's action and reasons. Only public REST endpoints are
called, unsigned: no Bitvavo credentials are read. Redis as the `universe` user (blocks/runtime.py).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from blocks.runtime import with_redis_user_sync
from flows.lateness import late_note, lateness_s
from trading.clock import now_ms
from trading.config import Settings
from trading.exchange.rest import BitvavoRest
from trading.redis_conn import redis_url, sync_client
from trading.universe import UniverseConfig, run_selection

ARTIFACT_KEY = "universe-selection"


@flow(name="universe-selection")
def universe_selection(
    top_n: int = 10,
    min_quote_volume_eur: Decimal = Decimal("250000"),
    max_spread_bps: Decimal = Decimal("30"),
    min_volatility_bps: Decimal = Decimal("0"),
    max_volatility_bps: Decimal | None = None,
    min_price: Decimal = Decimal("0"),
    max_price: Decimal | None = None,
    max_tick_bps: Decimal | None = None,
    min_range_bps: Decimal = Decimal("0"),
    max_range_bps: Decimal | None = None,
    min_depth_eur: Decimal = Decimal("0"),
    depth_bps: Decimal = Decimal("50"),
    blacklist: list[str] | None = None,
    quote: str = "EUR",
    candle_interval: str = "5m",
    volatility_candles: int = 48,
    min_qualify_s: int = 1800,
    min_fail_s: int = 3600,
    max_data_age_s: int = 300,
    max_lateness_s: int = 600,
) -> dict[str, Any]:
    """Pick the markets ingest records and the trading core trades; see docs/universe.md.

    A market joins after qualifying for `min_qualify_s` and leaves after failing for `min_fail_s`
    (hysteresis); failing a hard filter (name, status, quote, blacklist) removes it at once.

    Args:
        top_n: the universe's size at most: the top markets by 24 h quote volume among those passing.
        min_quote_volume_eur: minimum 24 h quote volume, EUR.
        max_spread_bps: maximum bid/ask spread, basis points of the mid.
        min_volatility_bps: minimum volatility per candle of `candle_interval`, basis points.
        max_volatility_bps: maximum volatility per candle, basis points; empty: no maximum.
        min_price: minimum last price, EUR.
        max_price: maximum last price, EUR; empty: no maximum.
        max_tick_bps: maximum size of one price tick, basis points of the price; empty: no maximum.
        min_range_bps: minimum 24 h high-low range, basis points of the low.
        max_range_bps: maximum 24 h high-low range, basis points of the low; empty: no maximum.
        min_depth_eur: minimum EUR on the thinner side of the book within `depth_bps` of the mid;
            0: no depth filter (and no REST book calls).
        depth_bps: how far from the mid the depth filter counts, basis points.
        blacklist: regular expressions of markets never selected (full match), e.g. ["(USDT|USDC)-EUR"].
        quote: quote currency of the markets considered.
        candle_interval: candle interval of the volatility filter (ingest records 1m and 5m).
        volatility_candles: closed candles in the volatility window.
        min_qualify_s: seconds a market must qualify before it joins.
        min_fail_s: seconds a member must fail a soft filter before it leaves.
        max_data_age_s: ticker or book entries older than this count as missing.
        max_lateness_s: a run starting later than this after its scheduled time decides nothing and says so.
    """
    logger = get_run_logger()
    lateness = lateness_s()
    if lateness > max_lateness_s:
        # A decision on data read long after its slot is worse than none: the next run decides.
        logger.warning("universe selection skipped: the run %s; trading:universe left unchanged",
                       late_note(lateness, max_lateness_s))
        return {"skipped": True, "reason": f"stale: {lateness:.0f}s late > max_lateness_s {max_lateness_s}"}

    config = UniverseConfig(
        top_n=top_n, min_quote_volume_eur=min_quote_volume_eur, max_spread_bps=max_spread_bps,
        min_volatility_bps=min_volatility_bps, max_volatility_bps=max_volatility_bps, min_price=min_price,
        max_price=max_price, max_tick_bps=max_tick_bps, min_range_bps=min_range_bps, max_range_bps=max_range_bps,
        min_depth_eur=min_depth_eur, depth_bps=depth_bps, blacklist=tuple(blacklist or ()), quote=quote,
        candle_interval=candle_interval, volatility_candles=volatility_candles, min_qualify_s=min_qualify_s,
        min_fail_s=min_fail_s, max_data_age_s=max_data_age_s)  # a bad parameter fails here, named
    settings = with_redis_user_sync(Settings.from_env(), "universe")
    rest = BitvavoRest(settings.bitvavo_rest_url)
    try:
        with redis_url(settings) as url:
            client = sync_client(url)
            try:
                outcome = run_selection(client, rest, config, now_ms=now_ms())
            finally:
                client.close()
    finally:
        rest.close()

    decision = outcome.decision
    create_table_artifact(key=ARTIFACT_KEY, table=decision.table_rows(),
                          description=f"Universe: {', '.join(decision.universe) or '(empty)'}; "
                                      f"added {list(decision.with_action('add'))}, "
                                      f"removed {list(decision.with_action('remove'))}")
    if decision.kept_previous:
        logger.warning("no market would remain in the universe: the previous members were kept")
    summary = outcome.summary()
    logger.info("universe: %d markets %s (+%s -%s, %d waiting) of %d evaluated; rejects %s; %d REST calls",
                len(decision.universe), list(decision.universe), summary["added"], summary["removed"],
                len(summary["waiting"]), summary["evaluated"], summary["rejects"], summary["gather_rest_calls"])
    return {"skipped": False, **summary}
