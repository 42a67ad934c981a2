"""Fixtures of the end-to-end tests."""

from tests.stack import running

__all__ = ["running"]
