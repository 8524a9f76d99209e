"""Prometheus: scrape config generated from the metrics catalogue, alert rules, their promtool tests."""
