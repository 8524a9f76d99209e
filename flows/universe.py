"""Universe selection deployment (`universe-selection`): decides `trading:universe` on a schedule.

The work is `trading.universe.run_selection`; this flow checks that its run is not stale, builds
the config from its parameters, and publishes the decision as a table artifact
(`universe-selection`) with every market's action and reasons. Only public REST endpoints are
called, unsigned: no credentials are read.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

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
    """Pick the markets ingest records and the trading core trades; see docs/universe.md."""
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
    settings = Settings.from_env()
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
