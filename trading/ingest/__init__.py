"""Realtime ingest: Bitvavo market data into Redis streams and the lake (no Prefect here)."""
