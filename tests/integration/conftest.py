"""Integration fixtures: see tests/harness.py and tests/ledger_harness.py."""

from tests.harness import harness
from tests.ledger_harness import ledger

__all__ = ["harness", "ledger"]
