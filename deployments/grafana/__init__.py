"""The Grafana dashboard, built as code with grafana-foundation-sdk."""
