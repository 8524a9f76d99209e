"""A GO decided while a NO-GO was recorded meanwhile does not overwrite it; the decision's artifact
links to its record and to the preflight run it used."""

from __future__ import annotations

import re
from pathlib import Path
from uuid import UUID

import pytest

from trading.clock import now_ms
from trading.golive import DecisionSupersededError, latest_decided_ms, live_gate, record_decision
from trading.redis_conn import async_client


async def test_a_go_never_overwrites_a_decision_it_did_not_see(redis_db_url: str) -> None:
    client = async_client(redis_db_url)
    try:
        seen = await latest_decided_ms(client) or ""
        assert seen == ""
        await record_decision(client, decision="NO-GO", operator="preflight", reason="NO-GO: redis", decided_ms=1,
                              valid_for_ms=1)  # a scheduled preflight fails while go-live is deciding
        with pytest.raises(DecisionSupersededError):
            await record_decision(client, decision="GO", operator="alice", reason="go", decided_ms=now_ms(),
                                  valid_for_ms=3_600_000, unless_changed_since=seen)
        assert not (await live_gate(client, now_ms())).open
        seen = await latest_decided_ms(client) or ""
        await record_decision(client, decision="GO", operator="alice", reason="go", decided_ms=now_ms(),
                              valid_for_ms=3_600_000, unless_changed_since=seen)
        assert (await live_gate(client, now_ms())).open
    finally:
        await client.aclose()


async def test_the_decision_artifact_links_its_record_and_the_preflight_run(
        prefect_api: str, redis_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.artifacts import Artifact
    from prefect.client.orchestration import get_client

    from flows.golive import GoLiveRefused, go_live

    lake = tmp_path / "lake"
    monkeypatch.setenv("REDIS_URL", redis_db_url)
    monkeypatch.setenv("PARQUET_DIR", str(lake))
    with pytest.raises(GoLiveRefused):  # nothing runs here, so preflight says NO-GO; the record is written anyway
        await go_live(operator="alice", reason="links", participants=["alice"], risks="none")

    artifact = await Artifact.aget("go-live-decision")
    assert artifact is not None and isinstance(artifact.data, str)
    (record,) = lake.glob("decisions/*/go-live-*Z.md")
    assert f"- decision record: `{record}` (in the lake: `{record.relative_to(lake)}`" in artifact.data
    ui = prefect_api.removesuffix("/api")
    link = re.search(rf"\[live preflight run\]\({re.escape(ui)}/runs/flow-run/([0-9a-f-]{{36}})\)", artifact.data)
    assert link, artifact.data
    async with get_client() as client:
        run = await client.read_flow_run(UUID(link[1]))
        assert (await client.read_flow(run.flow_id)).name == "preflight" and run.parameters["live"] is True
        assert run.state is not None and run.state.is_failed()  # the NO-GO this decision recorded
