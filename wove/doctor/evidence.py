"""Where a ping went when no event came back: asked of the backend itself, where it can tell.

Silence has two usual causes: no worker consumes the queue, or a worker ran the ping but cannot reach the callback
URL (it logs a ``CallbackError`` and retries, and the weave sees nothing). The backend can tell them apart when it
knows who holds a job: Celery's workers answer ``inspect``, RQ keeps each job's status. Elsewhere nothing can be
told from here, and the doctor names both causes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Evidence", "find_ping"]

logger = logging.getLogger("wove.doctor")

#: Seconds Celery's ``inspect`` waits for worker replies.
INSPECT_TIMEOUT = 1.0


@dataclass(frozen=True)
class Evidence:
    """What the backend says about the ping: ``taken`` is True (a worker has or had it), False (none took it), or
    None (the backend cannot tell); ``detail`` says how it knows."""

    taken: bool | None
    detail: str


def find_ping(adapter: Any, run_id: str) -> Evidence | None:
    """Ask the backend of ``adapter`` about job ``run_id`` (blocking; run it in a thread); None when it cannot say."""
    probe = _PROBES.get(getattr(adapter, "backend", ""))
    if probe is None:
        return None
    try:
        return probe(adapter, run_id)
    except Exception as exc:  # the backend could not answer: report the silence without evidence
        logger.debug("could not ask %r about run %s: %r", adapter, run_id, exc)
        return None


def _celery(adapter: Any, run_id: str) -> Evidence:
    queue = adapter.queue
    inspect = adapter.app.control.inspect(timeout=INSPECT_TIMEOUT)
    held = inspect.query_task(run_id) or {}
    for worker, tasks in held.items():
        if run_id in tasks:
            state = tasks[run_id][0]
            return Evidence(True, f"Celery worker {worker} holds the ping ({state})")
    queues = inspect.active_queues() or {}
    if not queues:
        return Evidence(False, "no Celery worker answered on the broker")
    consuming = sorted(worker for worker, listed in queues.items() if any(q.get("name") == queue for q in listed))
    if not consuming:
        return Evidence(False, f"Celery workers {', '.join(sorted(queues))} answer, but none consumes queue {queue!r}")
    return Evidence(None, f"Celery workers {', '.join(consuming)} consume queue {queue!r}; none reports the ping")


def _rq(adapter: Any, run_id: str) -> Evidence:
    from rq.job import Job
    from rq.worker import Worker

    queue = adapter.queue
    status = Job.fetch(run_id, connection=queue.connection, serializer=queue.serializer).get_status(refresh=True)
    state = str(getattr(status, "value", status))
    if state == "queued":
        workers = Worker.all(queue=queue)
        if not workers:
            return Evidence(False, f"the job is still queued and no RQ worker listens on queue {queue.name!r}")
        names = ", ".join(sorted(worker.name for worker in workers))
        return Evidence(False, f"the job is still queued; the workers on queue {queue.name!r} ({names}) are busy")
    return Evidence(True, f"an RQ worker took the job (status: {state})")


def _process(adapter: Any, run_id: str) -> Evidence:
    return Evidence(True, "the process pool runs its own workers on this machine")


_PROBES: dict[str, Callable[[Any, str], Evidence]] = {"celery": _celery, "rq": _rq, "process": _process}
