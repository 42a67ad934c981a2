"""Shared plumbing of the HTTP channels (httpx)."""

from __future__ import annotations

import email.utils
import time

import httpx


def make_client(timeout: float, client: httpx.AsyncClient | None) -> tuple[httpx.AsyncClient, bool]:
    """The given client (not ours to close), or a new one that is."""
    if client is not None:
        return client, False
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout), follow_redirects=False, trust_env=False), True


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def transport_failure(exc: httpx.HTTPError) -> str:
    """A short reason for a failed exchange, without the URL (it may carry a signed query)."""
    if isinstance(exc, httpx.TimeoutException):
        return f"timeout ({type(exc).__name__})"
    return f"{type(exc).__name__}"
