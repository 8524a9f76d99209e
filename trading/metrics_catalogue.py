"""The metrics catalogue: every family each loop exports, read from the loops' own metrics classes.

Each exporter's metrics class is instantiated on a fresh registry and the registry walked
(name, type, help from `collect()`, label names from the registered collector), so the catalogue
is the code. `python -m trading.metrics_catalogue > docs/metrics.md` writes the operator's
reference; a unit test fails when that file differs from what the code gives. The alert rules
and the Grafana dashboard are checked against `Catalogue.resolves`: every metric name a PromQL
expression uses must be a series some loop exposes.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache

from prometheus_client import CollectorRegistry

from trading import ops_metrics, pnl_orchestrator, signal_engine, trading_core
from trading.execution import executor
from trading.metrics import IngestMetrics

# Series names prometheus_client puts on the wire, per family type (`_created` is the
# creation time of a counter or histogram child, exported as a gauge).
SERIES_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}
# Prometheus' own series: about each target, and the state of each alert (labelled like the
# series that raised it). Always resolvable.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped",
                               "scrape_samples_post_metric_relabeling", "scrape_series_added", "ALERTS",
                               "ALERTS_FOR_STATE"})


@dataclass(frozen=True)
class Family:
    name: str  # as queried: a counter with its `_total`
    type: str
    labels: tuple[str, ...]
    help: str
    base: str  # the name given to prometheus_client

    @property
    def series(self) -> tuple[str, ...]:
        return tuple(self.base + suffix for suffix in SERIES_SUFFIXES[self.type])


@dataclass(frozen=True)
class Job:
    name: str  # Prometheus job label = the Prefect deployment that runs the loop
    port: int  # default metrics port on METRICS_HOST (127.0.0.1)


@dataclass(frozen=True)
class Exporter:
    title: str
    source: str  # the metrics class, for the reader
    jobs: tuple[Job, ...]
    new_registry: Callable[[], CollectorRegistry]

    @property
    def families(self) -> tuple[Family, ...]:
        return families_of(self.new_registry())


# The ingest ports are the flows' defaults (flows/ingest.py, prefect.yaml); a test checks they agree.
EXPORTERS: tuple[Exporter, ...] = (
    Exporter("ingest", "trading.metrics.IngestMetrics",
             (Job("ingest-ticker24h", 9611), Job("ingest-orderbook", 9612), Job("ingest-candles", 9613)),
             lambda: IngestMetrics().registry),
    Exporter("signal engine", "trading.signal_engine.SignalEngineMetrics",
             (Job("signal-engine", signal_engine.DEFAULT_METRICS_PORT),),
             lambda: signal_engine.SignalEngineMetrics().registry),
    Exporter("trading core", "trading.trading_core.TradingCoreMetrics",
             (Job("trading-core", trading_core.DEFAULT_METRICS_PORT),),
             lambda: trading_core.TradingCoreMetrics().registry),
    Exporter("executor", "trading.execution.executor.ExecutorMetrics",
             (Job("executor", executor.DEFAULT_METRICS_PORT),),
             lambda: executor.ExecutorMetrics().registry),
    Exporter("pnl", "trading.pnl_orchestrator.PnlMetrics",
             (Job("pnl-orchestrator", pnl_orchestrator.DEFAULT_METRICS_PORT),),
             lambda: pnl_orchestrator.PnlMetrics().registry),
    Exporter("ops", "trading.ops_metrics.OpsMetrics",
             (Job("ops-metrics", ops_metrics.DEFAULT_METRICS_PORT),),
             lambda: ops_metrics.OpsMetrics().registry),
)


def families_of(registry: CollectorRegistry) -> tuple[Family, ...]:
    """Every family registered, in registration order."""
    # Label names live only on the collector objects (a labelled family without children has no
    # samples to read them from); the registry maps each exposed name to its collector.
    collectors = registry._names_to_collectors
    found: list[Family] = []
    for metric in registry.collect():
        labels = tuple(getattr(collectors[metric.name], "_labelnames", ()))
        name = metric.name + "_total" if metric.type == "counter" else metric.name
        found.append(Family(name, metric.type, labels, metric.documentation, metric.name))
    return tuple(found)


@dataclass(frozen=True)
class Catalogue:
    exporters: tuple[Exporter, ...]
    families: dict[str, tuple[Family, ...]]  # exporter title -> its families

    @property
    def jobs(self) -> tuple[Job, ...]:
        return tuple(job for exporter in self.exporters for job in exporter.jobs)

    def all_families(self) -> Iterator[Family]:
        for exporter in self.exporters:
            yield from self.families[exporter.title]

    def series_names(self) -> frozenset[str]:
        return frozenset(name for family in self.all_families() for name in family.series) | PROMETHEUS_SERIES

    def resolves(self, name: str) -> bool:
        return name in self.series_names()

    def unresolved(self, expr: str) -> list[str]:
        """The metric names `expr` uses that no loop exposes (empty: the expression resolves)."""
        return sorted(name for name in metric_names_in(expr) if not self.resolves(name))

    def families_of_job(self, job: str) -> tuple[Family, ...]:
        for exporter in self.exporters:
            if any(j.name == job for j in exporter.jobs):
                return self.families[exporter.title]
        raise KeyError(f"no exporter has the job {job!r}")


@cache
def catalogue() -> Catalogue:
    return Catalogue(EXPORTERS, {exporter.title: exporter.families for exporter in EXPORTERS})


# -- PromQL: which metric names an expression reads -------------------------------------------------

_PROMQL_WORDS = frozenset({
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "inf", "nan", "atan2", "start", "end",
})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])[A-Za-z_:][\w:]*")


def metric_names_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or labels.

    Strings, label matchers, ranges and grouping clauses are removed first; what remains that
    is not followed by `(` (a function or aggregation) is a metric name. Grafana variables
    (`$__rate_interval`, `$market`) only occur inside the removed parts or start with `$`. A selector
    by `__name__` is refused: it would hide its metric names from the check.
    """
    if "__name__" in expr:
        raise ValueError(f"select metrics by name, not by __name__: {expr}")
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group(0)
        if word.lower() in _PROMQL_WORDS or text[match.end():].lstrip().startswith("("):
            continue
        names.add(word)
    return names


# -- the document -----------------------------------------------------------------------------------

def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "\\<")  # `<stream>` is not an HTML tag


def render_markdown(cat: Catalogue) -> str:
    lines = [
        "# Metrics catalogue",
        "",
        "Generated from the loops' metrics classes by `python -m trading.metrics_catalogue > docs/metrics.md`;",
        "do not edit by hand (`tests/unit/test_metrics_catalogue.py` fails when this file and the code differ).",
        "The alert rules (`deployments/prometheus/alerts.yml`, explained in [`alerts.md`](alerts.md)) and the",
        "Grafana dashboard (`deployments/grafana/`) are tested to use only the series listed here.",
        "",
        "Every endpoint binds `METRICS_HOST` (127.0.0.1 by default) and serves `/metrics`. On the wire a",
        "counter `x_total` also has `x_created`; a histogram `x` is `x_bucket{le}`, `x_sum`, `x_count` and",
        "`x_created`. Prometheus adds `up` and `scrape_*` for each target, and `ALERTS` for the alerts.",
        "",
        "## Scrape targets",
        "",
        "| job | default port | metrics class | families |",
        "|---|---|---|---|",
    ]
    for exporter in cat.exporters:
        for job in exporter.jobs:
            lines.append(f"| `{job.name}` | {job.port} | `{exporter.source}` | {len(cat.families[exporter.title])} |")
    for exporter in cat.exporters:
        jobs = ", ".join(f"`{job.name}` :{job.port}" for job in exporter.jobs)
        lines += ["", f"## {exporter.title} (`{exporter.source}`)", "", f"Jobs: {jobs}.", "",
                  "| metric | type | labels | meaning |", "|---|---|---|---|"]
        for family in cat.families[exporter.title]:
            labels = ", ".join(family.labels) or "—"
            lines.append(f"| `{family.name}` | {family.type} | {labels} | {_cell(family.help)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.stdout.write(render_markdown(catalogue()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
