"""Links from artifacts to what they describe: flow runs in the Prefect UI."""

from __future__ import annotations

from uuid import UUID

from prefect.utilities.urls import url_for


def flow_run_link(label: str, run_id: UUID | str) -> str:
    """A markdown link to the run in the UI (PREFECT_UI_URL, else derived from PREFECT_API_URL); without
    either, the label with the run's id, which `prefect flow-run inspect` takes."""
    url = url_for("flow-run", obj_id=run_id)
    return f"[{label}]({url})" if url else f"{label} (flow run `{run_id}`)"
