"""Shared by the asyncio task-system workers (ARQ, Taskiq, Temporal): run one payload, end duplicates quietly.

Such a worker runs many payloads concurrently on one event loop; their posts share the loop's keep-alive
connections to the callback server (:mod:`wove.backend.aclient`), which ``close_connections`` closes when the worker
shuts down.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from wove.backend.aclient import close_connections, keep_connections
from wove.errors import CallbackError

__all__ = ["close_connections", "run_payload"]

logger = logging.getLogger("wove.integrations.worker")


async def run_payload(payload: Mapping[str, Any]) -> None:
    """Run one wove payload and report its events to the weave; returns nothing, so the engine stores nothing.

    The task's own exception propagates after it was reported, so the engine records the job as failed. A payload
    whose run the weave has already closed (cancelled, timed out, presumed lost) is skipped before the task runs.
    """
    from wove.backend.worker import run_backend_payload_async

    keep_connections()
    try:
        await run_backend_payload_async(payload)
    except CallbackError as exc:
        if not exc.duplicate_delivery:
            raise
        logger.info("run %s skipped: the weave no longer waits for it (cancelled or lost)", payload.get("run_id"))
