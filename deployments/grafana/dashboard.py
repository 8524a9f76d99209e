"""The Grafana dashboard of the trading stack, built with grafana-foundation-sdk.

    python -m deployments.grafana.dashboard      # writes deployments/grafana/trading-stack.json

Import the JSON in Grafana (Dashboards → New → Import) and pick the Prometheus data source that
scrapes `deployments/prometheus/prometheus.yml`. Rows: feed health, signals, orders, PnL and
exposure, ops. The PnL row shows the paper and live ledgers side by side (legend `{{mode}}`); the
`mode` variable (default all) narrows it to one. `tests/unit/test_dashboard.py` checks that the
committed JSON is what this module builds and that every query reads only series listed in
docs/metrics.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.builders.common import VizLegendOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    LegendDisplayMode,
    LegendPlacement,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

from trading.metrics_catalogue import catalogue

OUTPUT = Path(__file__).with_name("trading-stack.json")
UID = "trading-stack"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
MARKET = 'market=~"$market"'
MODE = 'mode=~"$mode"'
RATE = "$__rate_interval"
# The jobs of this stack: `up` on a shared Prometheus also has other targets.
JOBS = 'job=~"' + "|".join(job.name for job in catalogue().jobs) + '"'

Query = tuple[str, str]  # (PromQL, legend)


def _target(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)


def _with_targets(panel: Any, queries: Sequence[Query]) -> Any:
    for index, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_target(expr, legend, chr(ord("A") + index)))
    return panel


def graph(title: str, description: str, unit: str, *queries: Query, width: int = 8) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
             .height(8).span(width).fill_opacity(10)
             .legend(VizLegendOptions().display_mode(LegendDisplayMode.LIST).placement(LegendPlacement.BOTTOM)
                     .show_legend(True)))
    result: timeseries.Panel = _with_targets(panel, queries)
    return result


def single(title: str, description: str, unit: str, query: Query, *, steps: Sequence[tuple[float | None, str]],
           mappings: dict[str, tuple[str, str]] | None = None, width: int = 4) -> stat.Panel:
    """A stat panel: coloured by `steps` (value, colour); `mappings` show a value as text."""
    panel = (stat.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
             .height(4).span(width).graph_mode(BigValueGraphMode.AREA).color_mode(BigValueColorMode.BACKGROUND)
             .thresholds(db.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE)
                         .steps([Threshold(value=value, color=color) for value, color in steps])))
    if mappings:
        panel = panel.mappings([ValueMap(options={value: ValueMappingResult(text=text, color=color, index=index)
                                                  for index, (value, (text, color)) in enumerate(mappings.items())})])
    result: stat.Panel = _with_targets(panel, [query])
    return result


def p99(histogram: str, by: str = "", selector: str = "") -> str:
    group = f"{by}, le" if by else "le"
    return f"histogram_quantile(0.99, sum by ({group}) (rate({histogram}_bucket{{{selector}}}[{RATE}])))"


def feed_health() -> list[Any]:
    return [
        graph("Messages/s by channel", "Messages received per second (ingest_messages_total)", "ops",
              (f"sum by (channel) (rate(ingest_messages_total{{{MARKET}}}[{RATE}]))", "{{channel}}")),
        graph("Last message age", "Seconds since each channel's last message per market; alert IngestFeedStale",
              "s", (f"max by (channel, market) (ingest_last_message_age_seconds{{{MARKET}}})",
                    "{{channel}} {{market}}")),
        graph("Receive lag p99", "Receive time minus exchange time, 99th percentile", "s",
              (p99("ingest_lag_seconds", "channel"), "{{channel}}")),
        graph("Gaps and resyncs", "Gap-ledger entries by kind and order-book resyncs", "short",
              (f"sum by (kind) (increase(ingest_gaps_total{{{MARKET}}}[{RATE}]))", "gap {{kind}}"),
              (f"sum by (market) (increase(ingest_resyncs_total{{{MARKET}}}[{RATE}]))", "resync {{market}}")),
        graph("Reconnects and malformed messages", "WebSocket reconnects; malformed messages skipped", "short",
              (f"sum by (channel) (increase(ingest_reconnects_total[{RATE}]))", "reconnect {{channel}}"),
              (f"sum by (channel) (increase(ingest_parse_errors_total[{RATE}]))", "malformed {{channel}}")),
        graph("Stream length", "Entries in each Redis stream (trimmed at STREAM_MAXLEN)", "short",
              ("max by (stream) (ingest_stream_length)", "{{stream}}")),
    ]


def signals() -> list[Any]:
    return [
        graph("Signals/s", "Signals emitted by market and side", "ops",
              (f"sum by (market, side) (rate(trader_signal_engine_signals_total{{{MARKET}}}[{RATE}]))",
               "{{market}} {{side}}")),
        graph("Book entries by outcome", "Valid book entries evaluated, by the strategy's outcome", "ops",
              (f"sum by (outcome) (rate(trader_signal_engine_book_entries_total{{{MARKET}}}[{RATE}]))",
               "{{outcome}}")),
        graph("Spread and volatility", "Latest spread and rolling volatility of mid returns", "short",
              (f"trader_signal_engine_spread_bps{{{MARKET}}}", "spread {{market}} (bps)"),
              (f"trader_signal_engine_volatility_bps{{{MARKET}}}", "volatility {{market}} (bps)")),
        graph("Signal engine latency p99", "Evaluation time per entry; entry age at evaluation", "s",
              (p99("trader_signal_engine_processing_seconds"), "processing"),
              (p99("trader_signal_engine_entry_age_seconds"), "entry age")),
        graph("Bad input and window resets", "Book entries dead-lettered as bad input; rolling windows restarted",
              "short",
              (f"sum by (reason) (increase(trader_signal_engine_rejects_total[{RATE}]))", "reject {{reason}}"),
              (f"sum by (reason) (increase(trader_signal_engine_window_resets_total{{{MARKET}}}[{RATE}]))",
               "reset {{reason}}")),
    ]


def orders() -> list[Any]:
    return [
        single("Kill switch", "trading:kill as the trading core last read it; alert KillSwitchOn",
               "none", ("max(trading_core_kill_switch)", "kill switch"),
               steps=[(None, "green"), (1, "red")], mappings={"0": ("off", "green"), "1": ("ON", "red")}),
        single("Open intents", "Intents sent and not final (MAX_OPEN_INTENTS default 20)", "none",
               ("max(trading_core_open_intents)", "open intents"), steps=[(None, "green"), (15, "orange")]),
        single("Open orders", "Orders whose latest report is not final", "none",
               ("sum(trader_executor_open_orders)", "open orders"), steps=[(None, "green"), (10, "orange")]),
        graph("Intents/s", "Intents the trading core emitted to orders:shadow", "ops",
              (f"sum by (market, side) (rate(trading_core_intents_total{{{MARKET}}}[{RATE}]))",
               "{{market}} {{side}}"), width=12),
        graph("Signals refused by guard", "The first failing guard of each refused signal", "ops",
              (f"sum by (guard) (rate(trading_core_rejects_total[{RATE}]))", "{{guard}}")),
        graph("Executions by status", "Execution reports recorded, by order status and mode", "ops",
              (f"sum by (status, mode) (rate(trader_executor_orders_total[{RATE}]))", "{{status}} {{mode}}")),
        graph("Executor refusals", "Intents refused before the venue, by reason", "short",
              (f"sum by (reason) (increase(trader_executor_refusals_total[{RATE}]))", "{{reason}}")),
        graph("Fills/s", "Fills recorded, maker or taker", "ops",
              (f"sum by (mode, liquidity) (rate(trader_executor_fills_total[{RATE}]))", "{{mode}} {{liquidity}}")),
        graph("Fees", "Net fees of the fills recorded since the executor started", "short",
              ("sum by (currency, mode) (trader_executor_fees)", "{{currency}} {{mode}}")),
        graph("Order path latency p99", "Signal to committed decision; venue.submit() per intent", "s",
              (p99("trading_core_decision_seconds"), "core decision"),
              (p99("trading_core_signal_age_seconds"), "signal age at decision"),
              (p99("trader_executor_submit_latency_seconds", "mode"), "submit {{mode}}")),
    ]


def pnl() -> list[Any]:
    # Paper and live are two ledgers: every figure is per mode, never summed across them.
    def by_mode(metric: str) -> str:
        return f"sum by (mode) ({metric}{{{MODE}}})"

    def by_market(aggregation: str, metric: str) -> str:
        return f"{aggregation} by (mode, market) ({metric}{{{MODE}, {MARKET}}})"

    # A market's anomaly counter appears at its first anomaly already at 1, which increase() does
    # not see; a series absent one interval earlier counts as that first anomaly.
    anomalies = f"trader_pnl_anomalies_total{{{MODE}, {MARKET}}}"
    return [
        single("Equity", "realized - fees + unrealized (EUR), per ledger", "currencyEUR",
               (by_mode("trader_pnl_equity_eur"), "{{mode}}"), steps=[(None, "red"), (0, "green")]),
        single("Realised today", "Realised PnL of today's fills minus their fees (UTC day), per ledger",
               "currencyEUR", (by_mode("trader_pnl_realized_today_eur"), "{{mode}}"),
               steps=[(None, "red"), (-200, "orange"), (0, "green")]),
        single("Unrealised", "At the marks, average cost, per ledger", "currencyEUR",
               (by_mode("trader_pnl_unrealized_eur"), "{{mode}}"), steps=[(None, "red"), (0, "green")]),
        single("Fees", "Fees paid, rebates deducted, per ledger", "currencyEUR",
               (by_mode("trader_pnl_fees_eur"), "{{mode}}"), steps=[(None, "blue")]),
        single("Exposure", "Sum over markets of position x mark, per ledger (MAX_EXPOSURE_TOTAL_EUR default 5000 "
               "applies to each)", "currencyEUR", (by_mode("trader_pnl_exposure_eur"), "{{mode}}"),
               steps=[(None, "green"), (4000, "orange"), (5000, "red")]),
        single("PnL age", "Seconds since the ledger hashes trading:pnl:paper and trading:pnl:live were written; "
               "alert PnlStale", "s", ("max(trader_pnl_last_update_age_seconds)", "age"),
               steps=[(None, "green"), (120, "red")]),
        graph("PnL", "Equity, realised (average cost and FIFO), unrealised, fees, per ledger", "currencyEUR",
              (by_mode("trader_pnl_equity_eur"), "equity {{mode}}"),
              (by_mode("trader_pnl_realized_eur"), "realized {{mode}}"),
              (by_mode("trader_pnl_realized_fifo_eur"), "realized FIFO {{mode}}"),
              (by_mode("trader_pnl_unrealized_eur"), "unrealized {{mode}}"),
              (by_mode("trader_pnl_fees_eur"), "fees {{mode}}"), width=12),
        graph("Exposure by market", "position x mark per ledger and market", "currencyEUR",
              (by_market("sum", "trader_pnl_market_exposure_eur"), "{{mode}} {{market}}"), width=12),
        graph("Positions", "Position in the base asset per ledger (spot: never below zero)", "short",
              (by_market("sum", "trader_pnl_position"), "{{mode}} {{market}}"), width=6),
        graph("Marks from the last fill", "1 while a market has no book mark and is valued at its last fill",
              "short", (by_market("max", "trader_pnl_mark_from_last_fill"), "{{mode}} {{market}}"), width=6),
        graph("Ledger", "Fills booked per ledger, duplicates skipped, unusable book entries", "short",
              (f"sum by (mode) (increase(trader_pnl_fills_applied_total{{{MODE}}}[{RATE}]))", "fills booked {{mode}}"),
              (f"sum(increase(trader_pnl_duplicate_fills_total[{RATE}]))", "duplicates"),
              (f"sum(increase(trader_pnl_bad_book_entries_total[{RATE}]))", "bad book entries"),
              (f"sum(increase(trader_pnl_snapshot_errors_total[{RATE}]))", "lake snapshot errors"), width=6),
        graph("Ledger anomalies", "Sell fills beyond the ledger's position (coins the bot did not hold), not "
              "booked; alert LedgerAnomaly, runbook docs/runbooks.md#ledger-anomaly", "short",
              (f"sum by (mode, market) (increase({anomalies}[{RATE}]) or ({anomalies} unless {anomalies} "
               f"offset {RATE}))", "{{mode}} {{market}}"), width=6),
    ]


_CONSUMERS = ("trader_signal_engine", "trading_core", "trader_executor", "trader_pnl")


def ops() -> list[Any]:
    def each(template: str, legend: str) -> list[Query]:
        return [(template.format(prefix=prefix), legend) for prefix in _CONSUMERS]

    return [
        graph("Scrape up", "1 while Prometheus scrapes the loop; alert LoopDown", "short",
              (f"up{{{JOBS}}}", "{{job}}"), width=12),
        graph("Rate-limit headroom",
              "Weight left in this minute's Bitvavo budget (1000/min); alert RateLimitHeadroomLow", "short",
              ("min by (job) (ingest_rate_limit_remaining)", "{{job}}"), width=12),
        graph("Consumer lag", "Entries in the stream not yet delivered to the loop's group", "short",
              *each("max by (job, stream) ({prefix}_consumer_lag)", "{{job}} {{stream}}")),
        graph("Pending", "Entries delivered to the group and not acknowledged", "short",
              *each("max by (job, stream) ({prefix}_pending)", "{{job}} {{stream}}")),
        graph("Dead letters and handler errors", "Entries moved to <stream>:dead; failed attempts (retried)",
              "short",
              *each("sum by (job, cause) (increase({prefix}_dead_letters_total[" + RATE + "]))",
                    "dead {{job}} {{cause}}"),
              *each("sum by (job) (increase({prefix}_handler_errors_total[" + RATE + "]))", "error {{job}}")),
        graph("Redis", "Redis reachable from the ops exporter and the ingest loops; Redis errors in the consumers",
              "short", ("max(trading_ops_redis_up)", "ops exporter up"),
              ("min by (job) (ingest_redis_up)", "{{job}} up"),
              *each("sum by (job) (increase({prefix}_redis_errors_total[" + RATE + "]))", "errors {{job}}")),
        graph("Redis memory", "used_memory against maxmemory (or the host's memory); alert RedisMemoryHigh",
              "bytes", ("max(trading_ops_redis_used_memory_bytes)", "used"),
              ("max(trading_ops_redis_memory_limit_bytes)", "limit")),
        graph("Lake disk", "Free space on PARQUET_DIR's file system; alerts LakeDiskLow, LakeDiskFillingUp",
              "percentunit", ("min(trading_ops_lake_free_bytes / trading_ops_lake_size_bytes)", "free")),
    ]


ROWS = (("Feed health", feed_health), ("Signals", signals), ("Orders", orders), ("PnL and exposure", pnl),
        ("Ops", ops))


_ALL = VariableOption(selected=True, text="All", value="$__all")


def build() -> db.Dashboard:
    board = (db.Dashboard("Trading stack").uid(UID).tags(["trading", "bitvavo", "generated"])
             .description("Generated by deployments/grafana/dashboard.py; metrics: docs/metrics.md")
             .refresh("30s").time("now-6h", "now").timezone("utc").tooltip(DashboardCursorSync.CROSSHAIR)
             .with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
             .with_variable(db.QueryVariable("market").label("Market").datasource(DATASOURCE)
                            .query("label_values(ingest_messages_total, market)")
                            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
                            .multi(True).include_all(True).all_value(".*")
                            .current(_ALL))
             .with_variable(db.CustomVariable("mode").label("Ledger").values("paper,live")
                            .multi(True).include_all(True).all_value(".*").current(_ALL)
                            .options([_ALL, *(VariableOption(selected=False, text=mode, value=mode)
                                              for mode in ("paper", "live"))])))
    for title, panels in ROWS:
        board = board.with_row(db.Row(title))
        for panel in panels():
            board = board.with_panel(panel)
    return board


def render() -> str:
    model = build().build()
    for number, panel in enumerate(model.panels or [], 1):  # stable ids: Grafana links panels by id
        panel.id_val = number
    return JSONEncoder(sort_keys=True, indent=2).encode(model) + "\n"


def main() -> int:
    OUTPUT.write_text(render())
    sys.stdout.write(f"wrote {OUTPUT}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
