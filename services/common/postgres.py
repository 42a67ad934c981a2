"""PostgreSQL connections, the same way in every service."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy

log = structlog.get_logger(__name__)

# A connection as handed out by a pool, or a plain one: both work wherever a Connection is asked.
# (asyncpg's classes are generic only in its type stubs.)
if TYPE_CHECKING:
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
else:
    Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy


# Errors that pass when the server or the network comes back: a batch is retried, never parked.
# Anything else (a value PostgreSQL refuses, a bug in a fold) is the event's fault: see
# services/common/consumer.py.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,  # serialization failure, deadlock
)


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 5, attempts: int = 30) -> asyncpg.Pool:
    """A pool, waiting (bounded) for a server that is still starting or restarting."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, command_timeout=60)
        except (OSError, asyncpg.CannotConnectNowError, asyncpg.PostgresConnectionError) as exc:
            if attempt == attempts:
                raise
            log.warning("postgresql not reachable yet", attempt=attempt, error=str(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")
