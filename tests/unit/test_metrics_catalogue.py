"""The metrics catalogue: docs/metrics.md is what the code exports, every family is documented, the
default ports agree with the deployments, and PromQL expressions resolve only against real series."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from trading.metrics_catalogue import Catalogue, Exporter, Job, catalogue, families_of, metric_names_in, render_markdown

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "metrics.md"
PREFIXES = {"ingest": "ingest_", "signal engine": "trader_signal_engine_", "trading core": "trading_core_",
            "executor": "trader_executor_", "pnl": "trader_pnl_", "ops": "trading_ops_"}


def test_docs_metrics_md_is_generated_from_the_code() -> None:
    assert DOC.read_text() == render_markdown(catalogue()), (
        "docs/metrics.md differs from the code: python -m trading.metrics_catalogue > docs/metrics.md")


def test_every_family_is_documented_with_type_labels_and_meaning() -> None:
    doc = DOC.read_text()
    families = list(catalogue().all_families())
    assert len(families) > 60
    for family in families:
        assert family.help.strip(), f"{family.name} has no help text"
        row = f"| `{family.name}` | {family.type} | {', '.join(family.labels) or '—'} |"
        assert row in doc, f"{family.name}: no row {row!r} in docs/metrics.md"


def test_each_loop_exports_only_its_own_prefix() -> None:
    cat = catalogue()
    assert set(cat.families) == set(PREFIXES)
    for title, families in cat.families.items():
        for family in families:
            assert family.name.startswith(PREFIXES[title]), f"{family.name} exported by the {title} loop"


def test_every_consumer_loop_exports_the_consumer_families() -> None:
    cat = catalogue()
    for title in ("signal engine", "trading core", "executor", "pnl"):
        names = {family.name for family in cat.families[title]}
        prefix = PREFIXES[title]
        assert {prefix + suffix for suffix in ("consumed_total", "dead_letters_total", "handler_errors_total",
                                               "pending", "consumer_lag", "redis_errors_total")} <= names


def test_kill_switch_gauge_is_catalogued() -> None:
    (family,) = [f for f in catalogue().families["trading core"] if f.name == "trading_core_kill_switch"]
    assert (family.type, family.labels) == ("gauge", ())


def test_families_are_read_from_the_registry_with_labels_and_wire_names() -> None:
    registry = CollectorRegistry()
    Counter("demo_events", "Events", ["market", "side"], registry=registry)
    Gauge("demo_level", "Level", registry=registry)
    Histogram("demo_latency_seconds", "Latency", ["mode"], buckets=(1.0,), registry=registry)
    families = {f.name: f for f in families_of(registry)}
    assert set(families) == {"demo_events_total", "demo_level", "demo_latency_seconds"}
    assert families["demo_events_total"].labels == ("market", "side")
    assert families["demo_events_total"].series == ("demo_events_total", "demo_events_created")
    assert families["demo_latency_seconds"].series == ("demo_latency_seconds_bucket", "demo_latency_seconds_sum",
                                                       "demo_latency_seconds_count", "demo_latency_seconds_created")
    assert families["demo_level"].series == ("demo_level",)


def test_a_new_metric_in_a_loop_class_changes_the_document() -> None:
    def with_extra() -> CollectorRegistry:
        registry = catalogue().exporters[0].new_registry()
        Gauge("ingest_new_thing", "Something new", registry=registry)
        return registry

    exporters = (Exporter("ingest", "x", (Job("ingest-x", 1),), with_extra),)
    changed = Catalogue(exporters, {e.title: e.families for e in exporters})
    assert "| `ingest_new_thing` | gauge | — | Something new |" in render_markdown(changed)


def test_queries_resolve_against_exposed_series_only() -> None:
    cat = catalogue()
    assert cat.unresolved("rate(trading_core_intents_total[5m])") == []
    assert cat.unresolved("histogram_quantile(0.99, sum by (le) (rate(trading_core_decision_seconds_bucket[5m])))") \
        == []
    assert cat.unresolved("up == 0") == []
    assert cat.unresolved("rate(trading_core_intents[5m])") == ["trading_core_intents"]  # counters end in _total
    assert cat.unresolved("trading_core_decision_seconds") == ["trading_core_decision_seconds"]  # a histogram
    assert cat.unresolved("rate(trading_core_signals_total[5m]) + nope") == ["nope", "trading_core_signals_total"]


@pytest.mark.parametrize(("expr", "names"), [
    ("rate(ingest_messages_total[5m])", {"ingest_messages_total"}),
    ("histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m])))", {"x_bucket"}),
    ('sum by (job, stream) (a{stream="orders:shadow", job=~"x|y"}) + on(job) group_left(mode) b offset 5m > bool 3',
     {"a", "b"}),
    ('absent(up{job="executor"}) or absent(up{job="pnl-orchestrator"})', {"up"}),
    ("max_over_time(x[1d]) - x > 2e3 and y unless z", {"x", "y", "z"}),
    ("predict_linear(free[6h], 24 * 3600) < 0", {"free"}),
    ("avg_over_time(rate(c_total[1m])[10m:1m])", {"c_total"}),
    ('sum without (instance) (g{market=~"$market"}) / ignoring(le) h', {"g", "h"}),
    ("sum by (job) (rate(c_total[$__rate_interval])) > Inf", {"c_total"}),
    ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
])
def test_metric_names_in_promql(expr: str, names: set[str]) -> None:
    assert metric_names_in(expr) == names


def test_metric_names_in_refuses_selectors_by_name_label() -> None:
    with pytest.raises(ValueError, match="__name__"):
        metric_names_in('{__name__=~"trading_.*"}')


def test_ingest_ports_match_the_flows_and_every_deployment_port_matches_its_job() -> None:
    jobs = {job.name: job.port for job in catalogue().jobs}
    tree = ast.parse((ROOT / "flows" / "ingest.py").read_text())
    flow_ports: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef) and node.name.startswith("ingest_"):
            arguments = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults \
                + node.args.kw_defaults
            for argument, default in zip(arguments, defaults, strict=True):
                if argument.arg == "metrics_port" and isinstance(default, ast.Constant):
                    flow_ports[node.name.replace("_", "-")] = default.value
    assert flow_ports == {name: port for name, port in jobs.items() if name.startswith("ingest-")}
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    with_ports = {d["name"]: d["parameters"]["metrics_port"] for d in deployments
                  if "metrics_port" in (d.get("parameters") or {})}
    assert len(with_ports) >= 7
    for name, port in with_ports.items():
        assert jobs.get(name) == port, f"prefect.yaml {name}: metrics_port {port}, catalogue {jobs.get(name)}"


def test_catalogue_module_does_not_import_prefect() -> None:
    code = "import sys, trading.metrics_catalogue; sys.exit('prefect' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60, check=False).returncode == 0


def test_cli_prints_the_document() -> None:
    result = subprocess.run([sys.executable, "-m", "trading.metrics_catalogue"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_markdown(catalogue())


def test_pnl_ledger_families_are_labelled_by_mode() -> None:
    families = {f.name: f for f in catalogue().families["pnl"]}
    for name in ("realized", "realized_fifo", "unrealized", "fees", "equity", "realized_today", "exposure"):
        assert families[f"trader_pnl_{name}_eur"].labels == ("mode",), name
    for name in ("trader_pnl_market_exposure_eur", "trader_pnl_position", "trader_pnl_mark_from_last_fill"):
        assert families[name].labels == ("mode", "market"), name
    assert families["trader_pnl_fills_applied_total"].labels == ("mode",)
    assert families["trader_pnl_ledger_fills"].labels == ("mode",)
    assert (families["trader_pnl_anomalies_total"].type, families["trader_pnl_anomalies_total"].labels) \
        == ("counter", ("mode", "market"))
    assert families["trader_pnl_last_update_age_seconds"].labels == ()  # one write covers both hashes
