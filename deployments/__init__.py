"""Deployment tooling: the one-command local stack, automations, Prometheus, Grafana, systemd."""
