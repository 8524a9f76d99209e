"""Secrets never reach logs, parameters, artifacts, events, Redis or the lake (design §7).

The credentials are a fresh random key pair saved in the `bitvavo-credentials` block, accepted by
a simulator started with them. The flows that use them run for real against a Prefect server
(preflight in live mode probes the key's withdrawal right; go-live runs preflight; the kill
switch writes events), then everything those runs left behind is searched for both values.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from blocks.credentials import BitvavoCredentials
from flows.golive import GoLiveRefused, go_live
from flows.ops import kill_switch
from flows.preflight import PreflightNoGo, preflight
from tests.integration.conftest import SimHandle


async def test_no_secret_in_logs_parameters_artifacts_events_redis_or_lake(
        sim_factory: Callable[..., SimHandle], prefect_api: str, redis_db_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    api_key, api_secret = secrets.token_hex(32), "s3cr3t-" + secrets.token_hex(16)
    sim = sim_factory("--api-key", api_key, "--api-secret", api_secret, markets="BTC-EUR")
    lake = tmp_path / "lake"
    for name, value in {"REDIS_URL": redis_db_url, "PARQUET_DIR": str(lake), "BITVAVO_REST_URL": sim.rest_url,
                        "BITVAVO_WS_URL": sim.ws_url, "BITVAVO_OPERATOR_ID": "7"}.items():
        monkeypatch.setenv(name, value)
    await BitvavoCredentials(api_key=SecretStr(api_key), api_secret=SecretStr(api_secret), operator_id=7,
                             rest_url=sim.rest_url, ws_url=sim.ws_url).asave("default", overwrite=True)

    with pytest.raises(PreflightNoGo):  # nothing runs here: NO-GO, but the credential check ran
        await preflight(live=True, drill=False, check_maintenance=False)
    with pytest.raises(GoLiveRefused):
        await go_live(operator="alice", reason="secret scan", participants=["alice"], risks="none")
    await kill_switch(enabled=True, operator="alice", reason="secret scan")

    from prefect.client.orchestration import get_client

    texts: list[str] = []
    async with get_client() as client:
        runs = await client.read_flow_runs(limit=200)
        assert {"preflight", "go-live", "kill-switch"} <= {(await client.read_flow(r.flow_id)).name for r in runs}
        texts += [repr(run.parameters) for run in runs]
        offset = 0
        while page := await client.read_logs(limit=200, offset=offset):  # the API pages by 200
            texts += [log.message for log in page]
            offset += len(page)
        texts += [repr(artifact.data) for artifact in await client.read_artifacts(limit=200)]
        events = await client.read_events(limit=50)  # the API pages by 50
        while True:
            texts += [event.model_dump_json() for event in events.events]
            if not events.next_page:
                break
            events = await client.read_events_page(events.next_page)
        # What the UI and API show (include_secrets=true returns plaintext to any API client: docs/scale-out.md).
        texts += [block.model_dump_json() for block in await client.read_block_documents(limit=100,
                                                                                        include_secrets=False)]
    credential_rows = [t for t in texts if "credentials present, no withdrawal right" in t]
    assert credential_rows and any("312" in t for t in credential_rows)  # the probe really reached the sim

    store = redis.Redis.from_url(redis_db_url, decode_responses=True)
    try:
        for key in store.scan_iter():
            kind = store.type(key)
            value = {"string": store.get, "hash": store.hgetall, "stream": store.xrange, "set": store.smembers,
                     "list": lambda k: store.lrange(k, 0, -1), "zset": lambda k: store.zrange(k, 0, -1)}[kind](key)
            texts.append(f"{key} {value}")
    finally:
        store.close()
    texts += [path.read_text(errors="replace") for path in lake.rglob("*") if path.is_file()]
    captured = capfd.readouterr()
    texts += [captured.out, captured.err]

    leaks = [text[:200] for text in texts if api_secret in text or api_key in text]
    assert not leaks, f"secret found in: {leaks}"
    assert any("go-live" in t or "NO-GO" in t for t in texts)  # the scan did see the runs' output
