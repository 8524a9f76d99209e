"""The Grafana dashboard: the committed JSON is the generated one, every query reads only catalogued series,
and every row the issue asks for is there with panels that have queries and a place on the grid."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from deployments.grafana.dashboard import OUTPUT, render
from trading.metrics_catalogue import catalogue

ROWS = ["Feed health", "Signals", "Orders", "PnL and exposure", "Ops"]


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    generated: dict[str, Any] = json.loads(render())
    return generated


def panels_by_row(board: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] | None = None
    for panel in board["panels"]:
        if panel["type"] == "row":
            current = rows.setdefault(panel["title"], [])
        else:
            assert current is not None, f"panel {panel['title']!r} before the first row"
            current.append(panel)
    return rows


def queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable."""
    found = [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            (metric,) = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["query"]).groups()  # type: ignore[union-attr]
            found.append((f"variable {variable['name']}", metric))
    return found


def test_committed_json_is_the_generated_one() -> None:
    assert Path(OUTPUT).read_text() == render(), "regenerate: python -m deployments.grafana.dashboard"


def test_every_query_resolves_against_the_catalogue(board: dict[str, Any]) -> None:
    cat = catalogue()
    found = queries(board)
    assert len(found) > 60
    for where, expr in found:
        assert cat.unresolved(expr) == [], f"{where}: {expr}"


def test_the_dashboard_reads_every_loop(board: dict[str, Any]) -> None:
    cat = catalogue()
    used = " ".join(expr for _where, expr in queries(board))
    for title, families in cat.families.items():
        assert any(family.base in used for family in families), f"no panel reads the {title} loop"
    for name in ("trading_core_kill_switch", "ingest_rate_limit_remaining", "trader_pnl_equity_eur",
                 "trading_ops_lake_free_bytes", "trader_executor_consumer_lag", "up{"):
        assert name in used


def test_rows_in_order_with_panels(board: dict[str, Any]) -> None:
    rows = panels_by_row(board)
    assert list(rows) == ROWS
    for title, panels in rows.items():
        assert len(panels) >= 4, title
        for panel in panels:
            assert panel["title"] and panel["description"], panel
            assert panel["targets"], f"{panel['title']}: no query"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"]
                assert target["legendFormat"]


def test_panels_have_unique_ids_and_do_not_overlap(board: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_market_filter_and_datasource_variables(board: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["market"]["includeAll"] and variables["market"]["allValue"] == ".*"
    assert any('market=~"$market"' in expr for _where, expr in queries(board))


def test_ledger_panels_show_each_mode_and_follow_the_mode_filter(board: dict[str, Any]) -> None:
    labelled = {family.base for family in catalogue().families["pnl"] if "mode" in family.labels}
    assert {"trader_pnl_equity_eur", "trader_pnl_anomalies"} <= labelled
    found = 0
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            if any(re.search(rf"\b{name}(_total)?\b", target["expr"]) for name in labelled):
                found += 1
                assert 'mode=~"$mode"' in target["expr"], f"{panel['title']}: {target['expr']}"
                assert re.search(r"by \(mode\b", target["expr"]), f"{panel['title']}: not grouped by mode"
                assert "{{mode}}" in target["legendFormat"], panel["title"]
    assert found >= 12


def test_ledger_anomalies_panel_per_mode_and_market(board: dict[str, Any]) -> None:
    (panel,) = [p for p in panels_by_row(board)["PnL and exposure"] if p["title"] == "Ledger anomalies"]
    (target,) = panel["targets"]
    assert "sum by (mode, market) (increase(trader_pnl_anomalies_total{" in target["expr"]
    assert target["legendFormat"] == "{{mode}} {{market}}"


def test_mode_filter_defaults_to_both_ledgers(board: dict[str, Any]) -> None:
    variable = {v["name"]: v for v in board["templating"]["list"]}["mode"]
    assert variable["type"] == "custom" and variable["query"] == "paper,live"
    assert variable["includeAll"] and variable["allValue"] == ".*" and variable["current"]["value"] == "$__all"
    assert [option["value"] for option in variable["options"]] == ["$__all", "paper", "live"]
