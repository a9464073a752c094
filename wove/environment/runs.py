"""Pending runs: each resolves exactly once, from its first terminal frame or from a delivery policy.

Lives on the runtime's event loop. Frames for runs it does not know (already resolved, never submitted,
forged by a confused worker) are dropped with a log line; a malformed frame never raises out of here.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from wove import tracing
from wove._types import EVENT_TYPES, TERMINAL_EVENTS, Frame
from wove.errors import (
    DeliveryLostError,
    DeliveryTimeoutError,
    OrphanedRunError,
    RemoteTaskError,
    RunCancelledError,
)
from wove.result import RunRecord

logger = logging.getLogger("wove.runtime")


class Requeue(Exception):
    """Internal: the run was lost and the orphan policy says submit it again."""


@dataclass
class RunRequest:
    """What a weave asks the runtime to run once in an environment."""

    environment: str
    task_name: str
    task_id: str
    func: Any
    args: dict[str, Any]
    delivery: Mapping[str, Any]
    record: RunRecord
    requeues_left: int = 0
    #: The weave's OpenTelemetry context when a span was active there (see ``wove.tracing``), else ``None``.
    trace_parent: Any = None


@dataclass
class PendingRun:
    """A submitted run waiting for its terminal frame."""

    request: RunRequest
    run_id: str
    future: asyncio.Future[Any]
    last_seen: float = field(default_factory=time.monotonic)
    started: bool = False
    cancel_requested: bool = False
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    span: tracing.RunSpan | None = None

    def frame(self) -> Frame:
        """The ``run_task`` command frame for this run."""
        req = self.request
        frame = {
            "type": "run_task",
            "run_id": self.run_id,
            "task_id": req.task_id,
            "task_name": req.task_name,
            "callable": req.func,
            "args": req.args,
            "delivery": dict(req.delivery),
        }
        if self.span is not None:  # the W3C trace context for the payload (see wove.tracing)
            frame["trace_context"] = self.span.carrier
        return frame


def exception_from_frame(frame: Frame) -> BaseException:
    """The exception a ``task_error`` frame stands for: the original instance when it survived the trip."""
    exc = frame.get("exception")
    if isinstance(exc, BaseException):
        return exc
    error = frame.get("error")
    return RemoteTaskError(error if isinstance(error, dict) else {"kind": "Exception", "message": repr(error)})


#: How many resolved run ids to remember, so late duplicates are told apart from unknown runs in logs.
RESOLVED_MEMORY = 100_000
#: Detached runs remembered (to log how they end); the oldest are forgotten first.
DETACHED_MEMORY = 10_000


class RunTable:
    """All pending runs of one runtime, keyed by run id."""

    def __init__(
        self,
        send_cancel: Callable[[PendingRun], object],
        forget: Callable[[PendingRun], object] | None = None,
    ) -> None:
        self._runs: dict[str, PendingRun] = {}
        self._resolved: deque[str] = deque(maxlen=RESOLVED_MEMORY)
        self._resolved_set: set[str] = set()
        self._detached: OrderedDict[str, PendingRun] = OrderedDict()
        self._send_cancel = send_cancel
        #: Tells the run's executor that nobody waits for the run any more (it was not cancelled).
        self._forget = forget

    def __len__(self) -> int:
        return len(self._runs)

    def pending(self, environment: str | None = None) -> list[PendingRun]:
        """Runs still waiting, optionally of one environment."""
        return [r for r in self._runs.values() if environment is None or r.request.environment == environment]

    def open(self, request: RunRequest) -> PendingRun:
        """Register a new run (a fresh run id per attempt and per requeue) and arm its delivery timeout."""
        loop = asyncio.get_running_loop()
        run = PendingRun(request, uuid.uuid4().hex, loop.create_future())
        self._runs[run.run_id] = run
        record = request.record
        if record.run_id is not None:  # a requeue: the record now describes the new run, and lists the lost one
            record.lost_runs.append(record.run_id)
            record.started_at = record.finished_at = record.host = record.pid = record.submission = None
            record.error = None
        record.run_id = run.run_id
        record.submitted_at = time.time()
        record.status = "submitted"
        timeout = request.delivery.get("timeout")
        if timeout:
            run.timers.append(loop.call_later(timeout, self._delivery_expired, run))
        if request.trace_parent is not None:
            run.span = tracing.start_run_span(
                request.trace_parent, task_name=request.task_name, environment=request.environment, run_id=run.run_id
            )
        return run

    def close(self, run: PendingRun) -> None:
        """Forget a run (after it resolved or was abandoned); later frames for it are dropped."""
        for timer in run.timers:
            timer.cancel()
        run.timers.clear()
        if run.span is not None:
            span, run.span = run.span, None
            span.end(run.request.record)
        if self._runs.pop(run.run_id, None) is not None:
            if len(self._resolved) == self._resolved.maxlen:
                self._resolved_set.discard(self._resolved[0])
            self._resolved.append(run.run_id)
            self._resolved_set.add(run.run_id)

    # -- frames -----------------------------------------------------------------------------------------------

    def on_frame(self, environment: str, frame: Any) -> None:
        """Apply one event frame. Unknown, malformed and duplicate frames are logged and dropped."""
        if not isinstance(frame, dict):
            logger.warning("environment %r sent a frame that is not a dict: %r", environment, type(frame).__name__)
            return
        kind = frame.get("type")
        run_id = frame.get("run_id")
        if kind not in EVENT_TYPES or not isinstance(run_id, str):
            logger.warning("environment %r sent a malformed frame (type=%r, run_id=%r)", environment, kind, run_id)
            return
        run = self._runs.get(run_id)
        if run is None:
            detached = self._detached.pop(run_id, None) if kind in TERMINAL_EVENTS else self._detached.get(run_id)
            if detached is not None:
                logger.info("detached run %s of task %r ended with %s", run_id, detached.request.task_name, kind)
            elif run_id in self._resolved_set:
                logger.debug("dropped duplicate %s for resolved run %s", kind, run_id)
            else:
                logger.warning("dropped %s for unknown run %s from environment %r", kind, run_id, environment)
            return
        if run.request.environment != environment:
            logger.warning("dropped %s for run %s: it belongs to another environment", kind, run_id)
            return
        run.last_seen = time.monotonic()
        if run.span is not None:
            run.span.observe(frame)
        record = run.request.record
        submission = frame.get("submission")
        if submission is not None:
            record.submission = str(submission)
        if kind == "task_started":
            self._on_started(run, frame)
        elif kind == "heartbeat":
            pass
        else:
            record.finished_at = _time(frame.get("finished_at", frame.get("at")))
            if record.started_at is None:  # no task_started came: a short run may carry its start in this frame
                record.started_at = _time(frame["started_at"]) if "started_at" in frame else record.finished_at
                host, pid = frame.get("host"), frame.get("pid")
                record.host = host if isinstance(host, str) else record.host
                record.pid = pid if isinstance(pid, int) else record.pid
            self._on_terminal(run, kind, frame)

    def _on_started(self, run: PendingRun, frame: Frame) -> None:
        if run.started:
            return
        run.started = True
        record = run.request.record
        record.started_at = _time(frame.get("started_at", frame.get("at")))
        record.status = "running"
        host, pid = frame.get("host"), frame.get("pid")
        record.host = host if isinstance(host, str) else record.host
        record.pid = pid if isinstance(pid, int) else record.pid
        heartbeat = run.request.delivery.get("heartbeat_seconds")
        if heartbeat:
            loop = asyncio.get_running_loop()
            run.timers.append(loop.call_later(heartbeat, self._check_heartbeat, run, heartbeat))

    def _on_terminal(self, run: PendingRun, kind: str, frame: Frame) -> None:
        record = run.request.record
        if kind == "task_result":
            record.status = "succeeded"
            self._resolve(run, result=frame.get("result"))
        elif kind == "task_error":
            exc = exception_from_frame(frame)
            if _lost_by_backend(frame, exc) and run.request.delivery.get("orphan_policy") == "requeue":
                # The backend saw the worker die (a pool's pipe closed, a job ended without an outcome): the loss a
                # heartbeat would find later. The engine leaves lost runs to this policy, so it must requeue here.
                self.orphan(run, exc, may_requeue=True)
                return
            record.status = "failed"
            record.error = exc
            self._resolve(run, error=exc)
        elif run.cancel_requested:
            record.status = "cancelled"
            self._resolve(run, error=asyncio.CancelledError())
        else:
            exc = RunCancelledError(
                f"the backend cancelled run {run.run_id} of task {run.request.task_name!r}",
                environment=run.request.environment,
                run_id=run.run_id,
            )
            record.status = "cancelled"
            record.error = exc
            self._resolve(run, error=exc)

    def _resolve(self, run: PendingRun, *, result: Any = None, error: BaseException | None = None) -> None:
        if not run.future.done():
            if isinstance(error, asyncio.CancelledError):
                run.future.cancel()  # an exception nobody retrieves would be logged at exit
            elif error is not None:
                run.future.set_exception(error)
            else:
                run.future.set_result(result)
        self.close(run)

    # -- delivery policies --------------------------------------------------------------------------------------

    def _delivery_expired(self, run: PendingRun) -> None:
        req = run.request
        timeout = req.delivery.get("timeout")
        exc = DeliveryTimeoutError(
            f"task {req.task_name!r} in environment {req.environment!r} sent no result within "
            f"delivery_timeout={timeout}s; the run was cancelled",
            environment=req.environment,
            run_id=run.run_id,
        )
        req.record.status = "timed out"
        req.record.error = exc
        self._send_cancel(run)
        self._resolve(run, error=exc)

    def _check_heartbeat(self, run: PendingRun, interval: float) -> None:
        if run.future.done():
            return
        silent = time.monotonic() - run.last_seen
        if silent < interval:
            loop = asyncio.get_running_loop()
            run.timers.append(loop.call_later(interval - silent, self._check_heartbeat, run, interval))
            return
        req = run.request
        exc = DeliveryLostError(
            f"task {req.task_name!r} in environment {req.environment!r}: no frame from its worker for "
            f"{silent:.1f}s (delivery_heartbeat_seconds={interval}); the worker is presumed lost",
            environment=req.environment,
            run_id=run.run_id,
        )
        self.orphan(run, exc, may_requeue=True)

    def orphan(self, run: PendingRun, exc: BaseException, *, may_requeue: bool) -> None:
        """End a run whose worker or executor is gone, as its ``orphan_policy`` says."""
        if run.future.done():
            self.close(run)
            return
        req = run.request
        policy = req.delivery.get("orphan_policy", "fail")
        if policy == "requeue" and may_requeue and req.requeues_left > 0:
            req.requeues_left -= 1
            logger.warning("requeueing task %r after: %s", req.task_name, exc)
            req.record.status = "requeued"
            self._abandon(run)
            self._resolve(run, error=Requeue(str(exc)))
            return
        if policy == "cancel":
            self._send_cancel(run)
        elif policy == "detach":  # it may still finish: keep listening, to log how it ended
            self._detached[run.run_id] = run
            if len(self._detached) > DETACHED_MEMORY:
                self._detached.popitem(last=False)
        else:
            self._abandon(run)
        req.record.status = "lost"
        req.record.error = exc
        self._resolve(run, error=exc)

    def _abandon(self, run: PendingRun) -> None:
        """Let the executor release the run (its callback URL, its job watch): the weave no longer waits for it."""
        if self._forget is not None:
            try:
                self._forget(run)
            except Exception:
                logger.exception("could not release abandoned run %s", run.run_id)


def orphaned_error(run: PendingRun, why: str) -> OrphanedRunError:
    """The error for a run still pending when its executor stopped."""
    req = run.request
    return OrphanedRunError(
        f"task {req.task_name!r} was still running in environment {req.environment!r} when {why}",
        environment=req.environment,
        run_id=run.run_id,
    )


def _lost_by_backend(frame: Frame, exc: BaseException) -> bool:
    """A ``task_error`` an adapter reported for a worker that died before it could (``BackendAdapter.report_lost``)."""
    error = frame.get("error")
    return isinstance(exc, DeliveryLostError) and isinstance(error, dict) and error.get("source") == "backend"


def _time(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else time.time()
