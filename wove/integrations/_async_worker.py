"""Shared by the asyncio task-system workers (ARQ, Taskiq): run one payload on a session kept per event loop.

Such a worker runs many payloads concurrently on one event loop. Without a shared aiohttp session each run would
open and close its own connection to the callback server; one session per loop keeps them alive between runs.
The session is created on first use; ``close_session`` releases it when the worker shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from wove.errors import CallbackError

if TYPE_CHECKING:
    import aiohttp

__all__ = ["close_session", "run_payload", "session"]

logger = logging.getLogger("wove.integrations.worker")

#: Connections the shared session keeps open to one callback server (runs in flight on one worker at once).
CONNECTIONS_PER_HOST = 64

_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = weakref.WeakKeyDictionary()


def session() -> aiohttp.ClientSession:
    """The running loop's callback session, created on first use (verifying HTTPS like the worker entrypoint)."""
    loop = asyncio.get_running_loop()
    current = _sessions.get(loop)
    if current is None or current.closed:
        import aiohttp

        from wove.backend.delivery import client_ssl_context

        connector = aiohttp.TCPConnector(limit=0, limit_per_host=CONNECTIONS_PER_HOST, ssl=client_ssl_context())
        current = _sessions[loop] = aiohttp.ClientSession(connector=connector)
    return current


async def close_session() -> None:
    """Close the running loop's session, if it has one."""
    current = _sessions.pop(asyncio.get_running_loop(), None)
    if current is not None:
        await current.close()


async def run_payload(payload: Mapping[str, Any]) -> None:
    """Run one wove payload and report its events to the weave; returns nothing, so the engine stores nothing.

    The task's own exception propagates after it was reported, so the engine records the job as failed. A payload
    whose run the weave has already closed (cancelled, timed out, presumed lost) is skipped before the task runs.
    """
    from wove.backend.worker import run_backend_payload_async

    try:
        await run_backend_payload_async(payload, session=session())
    except CallbackError as exc:
        if not exc.duplicate_delivery:
            raise
        logger.info("run %s skipped: the weave no longer waits for it (cancelled or lost)", payload.get("run_id"))
