"""The Redis role table (trading/redis_acl.py) covers every key of the stream contract (trading/bus.py):
each has a writer, the single-writer keys have exactly theirs, and the ACL arguments are well formed."""

from __future__ import annotations

import pytest

from trading import bus
from trading.lease import fencing_key
from trading.redis_acl import OPERATOR_ONLY_KEYS, roles, setuser_args, setuser_lines

ROLES = {spec.name: spec for spec in roles()}
LOOPS_AND_FLOWS = {"ingest", "signal-engine", "trading-core", "executor", "pnl", "ops-metrics", "kill-switch",
                   "flatten", "go-live", "preflight", "maintenance", "universe"}


def _contract_keys() -> list[str]:
    """Every key and stream bus.py names, a prefix or a template made concrete."""
    keys = [value for name, value in vars(bus).items()
            if isinstance(value, str) and name.startswith(("KEY_", "STREAM_", "ORDERS_", "TRADING_"))]
    return [*keys, bus.flatten_authorization_key("intent-1"), bus.stream_candles("1m"), "signals:baseline"]


def writers(key: str) -> set[str]:
    # Maintenance may RESTORE any key (its backup restore check; see trading/redis_acl.py): not a writer here.
    return {name for name, spec in ROLES.items() if spec.writes(key) and name != "maintenance"}


def test_the_table_has_exactly_the_known_roles() -> None:
    assert set(ROLES) == LOOPS_AND_FLOWS
    assert len(ROLES) == len(roles())


@pytest.mark.parametrize("key", _contract_keys())
def test_every_contract_key_has_a_writer(key: str) -> None:
    if key in OPERATOR_ONLY_KEYS:
        assert not writers(key), f"{key} is set by an operator by hand, never by a loop"
    else:
        assert writers(key), f"{key} is writable by no role"


def test_single_writer_keys() -> None:
    assert {n for n, s in ROLES.items() if s.allows("xadd", bus.ORDERS_SHADOW)} == {"trading-core", "flatten"}
    assert writers(bus.ORDERS_EXECUTED) == {"executor"}
    for key in (bus.KEY_INFLIGHT, bus.KEY_LIVE_OPEN, "orders:live:sent:x", "executor:paper:open"):
        assert writers(key) == {"executor"}, key
    assert writers(bus.KEY_KILL) == {"kill-switch", "flatten", "preflight"}
    assert writers(bus.flatten_authorization_key("x")) == {"flatten"}
    assert writers("signals:baseline") == {"signal-engine", "preflight"}  # preflight's drill signal
    assert writers(bus.KEY_PNL_PAPER) == writers(bus.KEY_PNL_LIVE) == {"pnl"}
    assert writers(bus.KEY_GOLIVE) == {"go-live", "preflight"}  # preflight: a NO-GO closes the gate
    assert writers(bus.KEY_UNIVERSE) == {"universe"}
    assert writers(bus.TRADING_EVENTS) == LOOPS_AND_FLOWS - {"maintenance"}


def test_consumers_read_their_stream_without_writing_it() -> None:
    for role, stream in (("signal-engine", bus.STREAM_BOOK), ("trading-core", "signals:baseline"),
                         ("executor", bus.ORDERS_SHADOW), ("pnl", bus.ORDERS_EXECUTED)):
        spec = ROLES[role]
        assert spec.allows("xreadgroup", stream) and spec.allows("xack", stream)
        assert not spec.allows("xadd", stream)
        assert spec.allows("xadd", bus.dead_letter_stream(stream))
        assert spec.allows("set", f"done:{role}:x")


def test_setuser_args_reset_the_user_and_carry_no_plaintext_given_a_hash() -> None:
    args = setuser_args(ROLES["executor"], "#" + "0" * 64)
    assert args[:4] == ["executor", "reset", "on", "#" + "0" * 64]
    assert all(a.startswith(("+", "(")) for a in args[4:])
    coarse = setuser_args(ROLES["executor"], "#" + "0" * 64, selectors=False)
    assert "~orders:shadow" in coarse and not any(a.startswith("(") for a in coarse)
    lines = setuser_lines()
    assert len(lines) == len(ROLES) and all(line.startswith("ACL SETUSER ") for line in lines)
    assert "><password:executor>" in lines[[s.name for s in roles()].index("executor")]


def test_the_live_send_claim_is_fenced_by_the_executor_lease_alone() -> None:
    # A selector allows EVALSHA only when one grant matches every key: the claim's KEYS (trading/execution/live.py).
    claim_keys = (bus.KEY_INFLIGHT, "orders:live:sent:x", bus.KEY_KILL, bus.KEY_GOLIVE, bus.KEY_PNL_LIVE,
                  fencing_key("executor"))
    assert any(all(grant.allows("evalsha", key) for key in claim_keys) for grant in ROLES["executor"].grants)
    assert writers(fencing_key("executor")) == {"executor"}
    assert {name for name, spec in ROLES.items() if spec.allows("evalsha", fencing_key("executor"))} == {"executor"}


def test_go_live_decides_and_the_checklist_is_preflight_s() -> None:
    # flows/golive.py runs the checklist as the preflight flow, under the preflight user: go-live needs none of it.
    go_live = ROLES["go-live"]
    assert go_live.allows("watch", bus.KEY_GOLIVE) and go_live.allows("hset", bus.KEY_GOLIVE)
    assert not any(go_live.allows(command, bus.KEY_KILL) for command in ("get", "set", "eval"))
    assert ROLES["preflight"].allows("exists", bus.STREAM_BOOK)  # the signal engine check
    assert not ROLES["maintenance"].allows("rename", "any-key")


def test_a_flow_reads_what_it_reads_before_its_loop_starts() -> None:
    # flows/executor.py picks the paper venue's markets from the universe (found by make up's restart test).
    assert ROLES["executor"].allows("hkeys", bus.KEY_UNIVERSE)
    assert ROLES["ingest"].allows("hkeys", bus.KEY_UNIVERSE)
    assert not ROLES["executor"].writes(bus.KEY_UNIVERSE)
