"""Integration fixtures: see tests/harness.py."""

from tests.harness import harness

__all__ = ["harness"]
