"""How late a scheduled run started: a backlog after downtime must not do stale work silently."""

from __future__ import annotations

from datetime import UTC, datetime

import prefect.runtime.flow_run


def lateness_s() -> float:
    """Seconds since the run's scheduled start (a run started by hand: since it was created)."""
    scheduled: datetime = prefect.runtime.flow_run.scheduled_start_time
    return max(0.0, (datetime.now(UTC) - scheduled).total_seconds())


def late_note(lateness: float, max_lateness_s: float) -> str:
    return f"started {lateness:.0f} s after its scheduled time (max_lateness_s {max_lateness_s:g})"
