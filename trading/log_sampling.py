"""Logging for events that can repeat per message: the first occurrence, then one in `every`.

Counters (and Prometheus) carry the full count; the log, which may be forwarded to the Prefect
API, must not grow with a flood of bad input.
"""


def worth_logging(count: int, every: int = 1000) -> bool:
    """True for the 1st, the `every`-th, the 2×`every`-th... occurrence (count starts at 1)."""
    return count == 1 or count % every == 0
