"""The alert rules: promtool accepts them and their unit tests pass; they read only catalogued series;
every alert has a firing and a quiet promtool case and a section in docs/alerts.md; prometheus.yml is
the generated one."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.prometheus.config import render
from trading.metrics_catalogue import catalogue

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deployments" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "tests" / "alerts_test.yml"
ALERTS_DOC = ROOT / "docs" / "alerts.md"


def find_tool(name: str) -> str | None:
    """`make tools` puts Debian's binaries under .venv/prometheus; else whatever PATH has."""
    local = ROOT / ".venv" / "prometheus" / "usr" / "bin" / name
    return str(local) if local.exists() else shutil.which(name)


@pytest.fixture(scope="module")
def promtool() -> str:
    path = find_tool("promtool")
    if path is None:
        pytest.skip("promtool not installed: `make tools` (deployments/prometheus/install_tools.sh) needs apt-get")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_check_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_check_config_loads_the_rules(promtool: str) -> None:
    result = run(promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules(promtool: str) -> None:
    result = run(promtool, "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules_fails_when_a_threshold_changes(promtool: str, tmp_path: Path) -> None:
    """The unit tests pin the thresholds: loosen one and they fail."""
    rule = "trader_pnl_realized_today_eur < -200"
    loosened = ALERTS.read_text().replace(rule, rule.replace("200", "300"))
    assert rule in ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(loosened)
    (tmp_path / "tests").mkdir()
    shutil.copy(RULE_TESTS, tmp_path / "tests" / RULE_TESTS.name)
    result = run(promtool, "test", "rules", str(tmp_path / "tests" / RULE_TESTS.name))
    assert result.returncode != 0
    assert "DailyLossNearLimit" in result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases: dict[str, list[bool]] = {}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in test.get("alert_rule_test", []):
            cases.setdefault(check["alertname"], []).append(bool(check.get("exp_alerts")))
    for rule in rules():
        name = rule["alert"]
        assert True in cases.get(name, []), f"{name}: no promtool case where it fires"
        assert False in cases.get(name, []), f"{name}: no promtool case where it stays quiet"


def test_every_alert_reads_only_catalogued_series() -> None:
    cat = catalogue()
    for rule in rules():
        assert cat.unresolved(rule["expr"]) == [], f"{rule['alert']}: not in docs/metrics.md"


def test_the_issue_list_of_alerts_is_covered() -> None:
    names = {rule["alert"] for rule in rules()}
    assert {"KillSwitchOn", "ExecutorBacklog", "ConsumerHandlerErrors", "DeadLetters", "TradingCoreRejectRateHigh",
            "ExecutorRefusals", "IngestFeedStale", "OrderbookResyncStorm", "RateLimitHeadroomLow", "PnlDrawdown",
            "PnlJump", "RedisMemoryHigh", "LakeDiskLow", "LoopDown", "LoopTargetMissing", "LedgerAnomaly"} <= names


def test_every_alert_has_a_severity_and_its_section_in_alerts_md() -> None:
    headings = set(re.findall(r"^### (\w+)$", ALERTS_DOC.read_text(), flags=re.MULTILINE))
    names = {rule["alert"] for rule in rules()}
    for rule in rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["runbook_url"] == f"docs/alerts.md#{name.lower()}", name
        assert name in headings, f"docs/alerts.md has no '### {name}' section"
    assert headings == names, f"sections without an alert: {sorted(headings - names)}"


def modes_selected(rule: dict[str, Any]) -> set[str]:
    return set(re.findall(r'\bmode="(\w+)"', rule["expr"]))


def test_a_name_repeats_only_as_one_rule_per_mode_live_critical_paper_warning() -> None:
    by_name: dict[str, list[dict[str, Any]]] = {}
    for rule in rules():
        by_name.setdefault(rule["alert"], []).append(rule)
    split = {name: same for name, same in by_name.items() if len(same) > 1}
    assert {"PnlDrawdown", "LedgerAnomaly"} <= set(split)
    for name, same in split.items():
        assert sorted(sorted(modes_selected(rule)) for rule in same) == [["live"], ["paper"]], (
            f"{name}: the rules of one name must each select one mode, paper and live")
        severities = {mode: rule["labels"]["severity"] for rule in same for mode in modes_selected(rule)}
        assert severities == {"live": "critical", "paper": "warning"}, name
        assert len({rule["annotations"]["summary"] for rule in same}) == 1, f"{name}: one summary for both modes"


def test_ledger_alerts_keep_the_mode_label() -> None:
    """A rule on a ledger metric may not aggregate `mode` away: paper and live are different books."""
    ledger = {f.base for f in catalogue().families["pnl"] if "mode" in f.labels}
    for rule in rules():
        if any(re.search(rf"\b{name}(_total)?\b", rule["expr"]) for name in ledger):
            for kind, grouping in re.findall(r"\b(by|without)\s*\(([^()]*)\)", rule["expr"]):
                named = {label.strip() for label in grouping.split(",")}
                assert ("mode" in named) == (kind == "by"), f"{rule['alert']}: aggregates the mode away"
            assert "{{ $labels.mode }}" in rule["annotations"]["summary"], rule["alert"]


def test_kill_switch_alert_reads_the_core_gauge() -> None:
    (rule,) = [r for r in rules() if r["alert"] == "KillSwitchOn"]
    assert "trading_core_kill_switch" in rule["expr"]


def test_loop_target_missing_names_every_job() -> None:
    (rule,) = [r for r in rules() if r["alert"] == "LoopTargetMissing"]
    named = set(re.findall(r'absent\(up\{job="([\w-]+)"\}\)', rule["expr"]))
    assert named == {job.name for job in catalogue().jobs}


def test_prometheus_yml_is_the_generated_one() -> None:
    assert (PROMETHEUS_DIR / "prometheus.yml").read_text() == render(), (
        "regenerate: python -m deployments.prometheus.config > deployments/prometheus/prometheus.yml")


def test_prometheus_yml_scrapes_every_loop_on_loopback_with_its_job() -> None:
    config = yaml.safe_load(render())
    assert config["rule_files"] == ["alerts.yml"]
    scraped = {c["job_name"]: c["static_configs"][0]["targets"] for c in config["scrape_configs"]}
    assert scraped == {job.name: [f"127.0.0.1:{job.port}"] for job in catalogue().jobs}


def test_render_refuses_a_job_no_loop_exports() -> None:
    with pytest.raises(ValueError, match="no loop exports the job"):
        render({"signal-engin": "127.0.0.1:1"})


def test_render_keeps_only_the_given_targets() -> None:
    config = yaml.safe_load(render({"executor": "127.0.0.1:4242"}, scrape_interval="1s", rule_files=["/r.yml"]))
    assert config["global"]["scrape_interval"] == "1s"
    assert config["rule_files"] == ["/r.yml"]
    assert [c["job_name"] for c in config["scrape_configs"]] == ["executor"]
