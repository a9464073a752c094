"""The ARQ worker side: the job function wove enqueues, and ``WorkerSettings`` for a worker that runs wove jobs.

Run a worker for wove's queue::

    WOVE_ARQ_REDIS_URL=redis://redis.internal:6379/0 arq wove.integrations.arq_worker.WorkerSettings

``WorkerSettings`` reads, at import: ``WOVE_ARQ_REDIS_URL`` (default ``redis://localhost:6379/0``),
``WOVE_ARQ_QUEUE`` (``arq:wove``), ``WOVE_ARQ_POLL_DELAY`` (seconds between queue polls, ``0.01``: ARQ's 0.5 s
default would dominate every round trip), ``WOVE_ARQ_MAX_JOBS`` (``10``) and ``WOVE_ARQ_JOB_TIMEOUT``
(``300``, ARQ's default; a job running longer is cancelled and the weave gets ``RunCancelledError``).
It sets ``allow_abort_jobs = True`` so that cancelling a weave stops its running jobs.

To run wove jobs in your own worker instead, add the function and allow aborts::

    from wove.integrations.arq_worker import wove_function, shutdown

    class WorkerSettings:
        functions = [my_job, wove_function]
        allow_abort_jobs = True
        on_shutdown = shutdown  # or await it from your own on_shutdown
"""

from __future__ import annotations

import os
from typing import Any

from arq.connections import RedisSettings
from arq.worker import func

from wove.integrations._async_worker import close_connections, run_payload
from wove.integrations.arq import DEFAULT_QUEUE, DEFAULT_REDIS_URL, FUNCTION_NAME, REDIS_URL_ENV

__all__ = ["WorkerSettings", "run", "shutdown", "wove_function"]

#: ARQ polls its queue; a job waits half of this on average before a worker sees it. Each poll costs the worker and
#: Redis a little CPU even when idle (about 6% of a core at 0.01 s, 16% at 0.002 s, nothing at ARQ's 0.5 s).
DEFAULT_POLL_DELAY = 0.01


async def run(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    """Run one wove payload; its result goes to the weave, so ARQ stores ``None``."""
    await run_payload(payload)


#: ``run`` registered under the name the adapter enqueues; add it to ``WorkerSettings.functions``.
wove_function = func(run, name=FUNCTION_NAME)


async def shutdown(ctx: dict[str, Any]) -> None:
    """Close the worker's connections to callback servers."""
    await close_connections()


def _env_number(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {raw!r}")
    return value


class WorkerSettings:
    """Settings for ``arq wove.integrations.arq_worker.WorkerSettings``: wove jobs only, on wove's queue."""

    functions = (wove_function,)
    redis_settings = RedisSettings.from_dsn(os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL)
    queue_name = os.environ.get("WOVE_ARQ_QUEUE") or DEFAULT_QUEUE
    poll_delay = _env_number("WOVE_ARQ_POLL_DELAY", DEFAULT_POLL_DELAY)
    max_jobs = int(_env_number("WOVE_ARQ_MAX_JOBS", 10, minimum=1))
    job_timeout = _env_number("WOVE_ARQ_JOB_TIMEOUT", 300)
    allow_abort_jobs = True
    on_shutdown = shutdown
