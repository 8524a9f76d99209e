"""The live gate opens only on a fresh GO with the kill switch off; decision records are dated files."""

from __future__ import annotations

from pathlib import Path

import pytest

from trading.golive import DECISION_GO, DECISION_NO_GO, DecisionRecord, gate_from_state, write_record

NOW = 1_795_000_000_000
GO = {"decision": "GO", "operator": "alice", "decided_ms": str(NOW - 1000), "valid_until_ms": str(NOW + 60_000)}


@pytest.mark.parametrize(("kill", "record", "is_open", "reason"), [
    (None, GO, True, "GO by alice"),
    (None, {}, False, "no go-live decision"),
    ("1", GO, False, "kill switch is on"),
    (b"1", GO, False, "kill switch is on"),
    ("0", GO, True, "GO by alice"),
    (None, {**GO, "decision": "NO-GO", "reason": "preflight"}, False, "NO-GO (preflight)"),
    (None, {**GO, "valid_until_ms": str(NOW)}, False, "expired"),
    (None, {**GO, "valid_until_ms": "soon"}, False, "no valid_until_ms"),
    (None, {b"decision": b"GO", b"operator": b"bob", b"valid_until_ms": str(NOW + 1).encode()}, True, "GO by bob"),
])
def test_gate(kill: object, record: dict[object, object], is_open: bool, reason: str) -> None:
    gate = gate_from_state(kill, record, NOW)
    assert gate.open is is_open
    assert reason in gate.reason


def test_decision_record_is_written_atomically_under_a_dated_path(tmp_path: Path) -> None:
    record = DecisionRecord(decision=DECISION_NO_GO, requested=DECISION_GO, operator="alice",
                            participants=("alice", "bob"), risks="new markets | fees", reason="weekly",
                            decided_ms=NOW, valid_until_ms=NOW + 3_600_000, preflight_go=False,
                            preflight_rows=({"check": "kill switch off", "status": "FAIL", "detail": "on | 1"},))
    path = write_record(tmp_path, record)
    assert path.parent == tmp_path / "decisions" / "2026-11-18"
    assert path.name.startswith("go-live-") and path.suffix == ".md"
    assert not list(path.parent.glob("*.tmp"))
    text = path.read_text()
    assert text.startswith("# Go-live decision: NO-GO")
    assert "- requested: GO" in text and "- participants: alice, bob" in text
    assert "| kill switch off | FAIL | on / 1 |" in text  # a pipe in a detail cannot break the table
    assert "valid until: not applicable (NO-GO)" in text
