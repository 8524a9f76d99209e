"""Lake maintenance (design §5): compaction of closed JSONL into Parquet, rotation, backup and
its restore check. Plain functions on paths and a Redis client; the scheduled flows in
`flows/maintenance.py` wire them to settings and report. See docs/maintenance.md."""
