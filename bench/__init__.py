"""Benchmarks that print figures (never asserted in tests). Run all with `make bench`."""
