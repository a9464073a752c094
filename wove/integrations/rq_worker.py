"""The RQ side of wove: the function RQ workers call for the ``rq`` backend, and worker classes that start warm.

Nothing needs registering: RQ imports ``wove.integrations.rq_worker.run_payload`` by name when a job arrives, so any
worker on the queue runs wove payloads once wove is installed next to it::

    rq worker -u redis://broker:6379/0 -w wove.integrations.rq_worker.SimpleWorker wove   # one process, no fork
    rq worker -u redis://broker:6379/0 -w wove.integrations.rq_worker.Worker wove         # a work horse per job

The two classes are RQ's own ``SimpleWorker`` and ``Worker`` with wove's worker code imported when the worker starts.
RQ's plain classes work too, but a forking worker then imports that code again in every work horse, tens of
milliseconds a job. Choose the forking worker when cancelling must stop a running task or a task may crash its
process; ``SimpleWorker`` when the fork per job would dominate short tasks.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Mapping
from typing import Any

from rq.worker import BaseWorker
from rq.worker import SimpleWorker as _RQSimpleWorker
from rq.worker import Worker as _RQWorker

from wove.integrations._redelivery import run_beside_main_thread, run_delivery

with contextlib.suppress(ImportError):  # unpickles callables shipped by value; the first payload would import it
    import cloudpickle  # noqa: F401

__all__ = ["SimpleWorker", "Worker", "run_payload"]

logger = logging.getLogger("wove.integrations.rq_worker")


def run_payload(payload: Mapping[str, Any]) -> None:
    """Run one wove payload and report to the weave; returns ``None`` (the value went to the weave).

    The task's own exception is re-raised after the weave got it, so the job lands in RQ's failed registry with its
    traceback. A job for a run that is no longer pending (a duplicate) returns without running anything.
    """
    if _sigterm_is_the_workers():
        run_beside_main_thread(payload, logger)
    else:
        run_delivery(payload, logger)


def _sigterm_is_the_workers() -> bool:
    """True in a worker that runs jobs in its own main thread (``SimpleWorker``), where SIGTERM asks RQ for a warm
    shutdown: finish the job, then stop. wove's entrypoint, run in the main thread, would take SIGTERM as a cancel."""
    if threading.current_thread() is not threading.main_thread():
        return False
    return isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), BaseWorker)


class Worker(_RQWorker):
    """RQ's forking worker; work horses inherit wove's worker code instead of importing it per job."""


class SimpleWorker(_RQSimpleWorker):
    """RQ's non-forking worker (jobs run in the worker process), with wove's worker code loaded at start."""
