"""Paths to the real Bitvavo recordings in ../shared/fixtures/bitvavo (see its README)."""

import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "bitvavo"


def wire_captures() -> list[dict[str, Any]]:
    lines = (FIXTURES / "bitvavo-wire-captures-2026-09-23.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def ccxt_responses() -> dict[str, Any]:
    data = json.loads((FIXTURES / "ccxt-static-response-bitvavo.excerpt.json").read_text())
    return {name: calls[0]["httpResponse"] for name, calls in data["methods"].items()}


def market_snapshot() -> dict[str, Any]:
    return json.loads((FIXTURES / "snapshot.excerpt.json").read_text())  # type: ignore[no-any-return]
