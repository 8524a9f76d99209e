"""Execution: the executor loop and its venues (paper in dry-run, Bitvavo in live mode)."""
