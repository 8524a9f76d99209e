"""Time helpers: every timestamp in this codebase is integer milliseconds since epoch, UTC."""

import time


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def now_ns() -> int:
    return time.time_ns()
