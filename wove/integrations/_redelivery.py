"""Run a payload a task system delivered: a copy of a finished run ends quietly, and a worker's SIGTERM stays its own.

Brokers deliver at least once: a Celery worker killed after posting a result but before acknowledging the message
(``acks_late``), an RQ job re-enqueued by hand, a revoke that missed a restarted worker. Such a copy reaches the
callback server while the first copy runs or after the run resolved, and the server refuses its first frame (or its
body download) before the task's code runs (``CallbackError.duplicate_delivery``). That refusal is the normal end of a
duplicate, not a failure.

Workers that run jobs in their main thread (RQ's ``SimpleWorker``, Celery's ``solo`` pool) use SIGTERM for a warm
shutdown; :func:`run_beside_main_thread` keeps wove's entrypoint, which would read it as a cancel, off that thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from queue import SimpleQueue
from typing import Any

from wove.backend.client import post_event
from wove.errors import CallbackError
from wove.integrations.worker import run

__all__ = ["run_beside_main_thread", "run_delivery"]

#: Seconds a run interrupted in the main thread (a job timeout, a cold shutdown) spends telling the weave it ended.
CANCEL_NOTICE_TIMEOUT = 5.0


def run_delivery(payload: Mapping[str, Any], logger: logging.Logger) -> None:
    """Run ``payload`` through ``wove.integrations.worker.run`` and return ``None``.

    The task's value goes to the weave, never to the task system (which would store or serialize it). The task's own
    exception is re-raised after the weave got it, so the task system records the job as failed. A copy of a run that
    is no longer pending returns quietly without running anything.
    """
    try:
        run(payload)
    except CallbackError as exc:
        if not exc.duplicate_delivery:
            raise
        logger.info(
            "run %s of task %r is %s; skipped this delivery",
            payload.get("run_id"),
            payload.get("task_name"),
            "already running elsewhere" if exc.reason == "run_already_started" else "no longer pending",
        )


def run_beside_main_thread(payload: Mapping[str, Any], logger: logging.Logger) -> None:
    """:func:`run_delivery` on a helper thread, for workers that run jobs in their main thread (RQ's ``SimpleWorker``,
    Celery's ``solo`` pool), where SIGTERM asks for a warm shutdown: finish the job, then stop.

    wove's entrypoint, run in the main thread, would take that SIGTERM as a cancel; here the main thread keeps the
    worker's own signal handling and only waits. An exception raised into the wait (a job timeout, a cold shutdown)
    cannot stop the task's thread: the weave is told the run was cancelled, and the exception goes on to the worker.
    """
    done = threading.Event()
    outcome: list[BaseException | None] = []

    def job() -> None:
        try:
            run_delivery(payload, logger)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    _helper.run(job, done)
    try:
        done.wait()
    except BaseException:
        if not done.is_set():
            _notify_cancelled(payload, logger)
        raise
    if outcome[0] is not None:
        raise outcome[0]


def _notify_cancelled(payload: Mapping[str, Any], logger: logging.Logger) -> None:
    frame = {"type": "task_cancelled", "run_id": payload.get("run_id"), "task_id": payload.get("task_id")}
    try:
        post_event(str(payload.get("callback_url")), frame, timeout=CANCEL_NOTICE_TIMEOUT)
    except Exception as exc:
        logger.warning("could not tell the weave that run %s was interrupted: %s", payload.get("run_id"), exc)


class _Helper:
    """A daemon thread kept for runs; a new one starts when a previous run outlived its job (a timeout)."""

    def __init__(self) -> None:
        self.jobs: SimpleQueue[tuple[Callable[[], None], threading.Event]] = SimpleQueue()
        self.busy = False
        self.thread: threading.Thread | None = None

    def run(self, job: Callable[[], None], done: threading.Event) -> None:
        """Run ``job`` on the kept thread (on a fresh one while it is still busy) and set ``done`` after it."""
        if self.busy:
            threading.Thread(target=self._once, args=(job, done), name="wove-run", daemon=True).start()
            return
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._serve, name="wove-run", daemon=True)
            self.thread.start()
        self.busy = True
        self.jobs.put((job, done))

    def _serve(self) -> None:
        while True:
            job, done = self.jobs.get()
            try:
                job()
            finally:
                self.busy = False  # before ``done``: the next run must find the thread free
                done.set()

    @staticmethod
    def _once(job: Callable[[], None], done: threading.Event) -> None:
        try:
            job()
        finally:
            done.set()


_helper = _Helper()
