"""Tracing across the process boundary with OpenTelemetry (optional: ``pip install 'wove[otel]'``).

When a span is active where a weave runs, each run of a remote task gets a span in the submitting process, from
submission to outcome (:class:`RunSpan`). Its W3C trace context travels in the payload's optional ``trace_context``
field (``traceparent`` and, when set, ``tracestate``), and the worker entrypoint continues the trace with a child
span around the task's execution (:class:`WorkerSpan`), current while the task runs, so spans the task makes nest
under it. The run's frames (``task_started``, heartbeats, the outcome) carry that span's ``trace_id`` and ``span_id``
back; the submitting span records them as ``wove.worker.trace_id`` and ``wove.worker.span_id``.

Nothing here imports OpenTelemetry until it is needed: the submitting side only looks for it in ``sys.modules`` (a
process with an active span has imported it), and a worker imports it only for a payload that carries a trace
context. A worker without ``opentelemetry-api``, or without an SDK set up (its span would not record), runs such
payloads untraced.

A worker exports spans through whatever SDK set-up its process has. Where the worker process runs no code of yours
before its first task (wove's ``process`` pool, a stock ``rq`` or ``celery`` worker), name a set-up function in
``WOVE_OTEL_SETUP`` (``module:function``): the worker calls it once, before its first traced run.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span

    from wove.result import RunRecord

__all__ = ["SETUP_ENV", "RunSpan", "WorkerSpan", "current_parent", "start_run_span", "start_worker_span"]

logger = logging.getLogger("wove.tracing")

#: The instrumentation scope name of every span wove makes.
TRACER_NAME = "wove"
#: Environment variable: ``module:function`` a worker calls once, before its first traced run, to set up the SDK.
SETUP_ENV = "WOVE_OTEL_SETUP"
#: The W3C trace context keys a payload's ``trace_context`` may hold.
CONTEXT_KEYS = ("traceparent", "tracestate")
#: Frame keys carrying the worker span's ids back to the submitting process.
ID_KEYS = ("trace_id", "span_id")


def current_parent() -> Context | None:
    """The caller's OpenTelemetry context when a valid span is current in it, else ``None``.

    Costs one dict lookup in a process that never imported OpenTelemetry: no span can be active there.
    """
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    try:
        if not trace.get_current_span().get_span_context().is_valid:
            return None
        from opentelemetry import context

        return context.get_current()
    except Exception:  # tracing never fails a weave
        logger.debug("could not read the current OpenTelemetry context", exc_info=True)
        return None


# -- the submitting side ----------------------------------------------------------------------------------------------


class RunSpan:
    """The submitting process's span of one remote run, from submission to outcome.

    ``carrier`` is the W3C trace context of this span, for the payload's ``trace_context``.
    """

    __slots__ = ("carrier", "span")

    def __init__(self, span: Span, carrier: dict[str, str]) -> None:
        self.span = span
        self.carrier = carrier

    def observe(self, frame: Mapping[str, Any]) -> None:
        """Record the worker span's ids when ``frame`` carries them."""
        trace_id, span_id = frame.get("trace_id"), frame.get("span_id")
        if isinstance(trace_id, str) and isinstance(span_id, str):
            self.span.set_attributes({"wove.worker.trace_id": trace_id, "wove.worker.span_id": span_id})

    def end(self, record: RunRecord) -> None:
        """End the span with where the run went and how it ended (from the run's record)."""
        try:
            from opentelemetry.trace import Status, StatusCode

            attributes: dict[str, Any] = {"wove.outcome": record.status}
            if record.submission is not None:
                attributes["wove.submission"] = record.submission
            if record.host is not None:
                attributes["wove.worker.host"] = record.host
            if record.pid is not None:
                attributes["wove.worker.pid"] = record.pid
            self.span.set_attributes(attributes)
            if record.error is not None:
                self.span.record_exception(record.error)
                self.span.set_status(Status(StatusCode.ERROR, f"{type(record.error).__name__}: {record.error}"))
            elif record.status != "succeeded":
                self.span.set_status(Status(StatusCode.ERROR, record.status))
            self.span.end()
        except Exception:
            logger.warning("could not end the span of run %s", record.run_id, exc_info=True)


def start_run_span(parent: Context, *, task_name: str, environment: str, run_id: str) -> RunSpan | None:
    """Start the span of one remote run under ``parent``; ``None`` (and a log line) if OpenTelemetry fails."""
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        span = trace.get_tracer(TRACER_NAME).start_span(
            f"wove.remote {task_name}",
            context=parent,
            kind=trace.SpanKind.CLIENT,
            attributes={"wove.task.name": task_name, "wove.environment": environment, "wove.run_id": run_id},
        )
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span, parent))
    except Exception:
        logger.warning("could not start a span for run %s of task %r", run_id, task_name, exc_info=True)
        return None
    return RunSpan(span, carrier)


# -- the worker side --------------------------------------------------------------------------------------------------


class WorkerSpan:
    """The worker's child span around one task's execution; ends once, when the task returns or raises."""

    __slots__ = ("context", "ids", "lock", "open", "span")

    def __init__(self, span: Span, context: Context) -> None:
        from opentelemetry.trace import format_span_id, format_trace_id

        self.span = span
        self.context = context  # the span made current: spans the task starts become its children
        ids = span.get_span_context()
        #: Fields for the run's frames: this span's ids, in W3C hex.
        self.ids = {"trace_id": format_trace_id(ids.trace_id), "span_id": format_span_id(ids.span_id)}
        self.lock = threading.Lock()
        self.open = True

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` running with this span current (in whatever thread calls it), ending the span with its outcome."""
        import inspect

        from opentelemetry import context

        if inspect.iscoroutinefunction(fn):

            async def traced_async(**kwargs: Any) -> Any:
                token = context.attach(self.context)
                try:
                    value = await fn(**kwargs)
                except BaseException as exc:
                    self.end(exc)
                    raise
                finally:
                    context.detach(token)
                self.end()
                return value

            return traced_async

        def traced(**kwargs: Any) -> Any:
            token = context.attach(self.context)
            try:
                value = fn(**kwargs)
            except BaseException as exc:
                self.end(exc)
                raise
            finally:
                context.detach(token)
            if hasattr(value, "__await__"):  # a sync callable returning an awaitable: the span lasts until awaited
                return self._awaited(value)
            self.end()
            return value

        return traced

    async def _awaited(self, awaitable: Any) -> Any:
        from opentelemetry import context

        token = context.attach(self.context)
        try:
            value = await awaitable
        except BaseException as exc:
            self.end(exc)
            raise
        finally:
            context.detach(token)
        self.end()
        return value

    def end(self, error: BaseException | None = None, *, outcome: str | None = None) -> None:
        """End the span (once): ``succeeded``, ``failed`` with ``error``, or the ``outcome`` given."""
        with self.lock:
            if not self.open:
                return
            self.open = False
        try:
            from opentelemetry.trace import Status, StatusCode

            if outcome is None:
                cancelled = error is not None and type(error).__name__ == "CancelledError"
                outcome = "succeeded" if error is None else "cancelled" if cancelled else "failed"
            self.span.set_attribute("wove.outcome", outcome)
            if error is not None and outcome == "failed":
                self.span.record_exception(error)
            if outcome != "succeeded":
                description = f"{type(error).__name__}: {error}" if error is not None else outcome
                self.span.set_status(Status(StatusCode.ERROR, description))
            self.span.end()
        except Exception:
            logger.warning("could not end the worker span", exc_info=True)

    def abandon(self) -> None:
        """The run ended without its task finishing (SIGTERM, an interrupt): end the span as cancelled."""
        self.end(outcome="cancelled")


_setup_lock = threading.Lock()
_setup_state: list[bool] = []  # [True] once OpenTelemetry is usable in this process, [False] once known not to be


def _opentelemetry_ready() -> bool:
    """Run the ``WOVE_OTEL_SETUP`` hook once, then tell whether ``opentelemetry-api`` is importable."""
    if _setup_state:
        return _setup_state[0]
    with _setup_lock:
        if _setup_state:
            return _setup_state[0]
        hook = os.environ.get(SETUP_ENV, "").strip()
        if hook:
            module, _, name = hook.partition(":")
            try:
                getattr(importlib.import_module(module), name or "setup")()
            except Exception:
                logger.warning("%s=%r failed; traces may not be exported", SETUP_ENV, hook, exc_info=True)
        try:
            import opentelemetry.trace  # noqa: F401
        except ImportError:
            logger.info("a payload carries a trace context, but opentelemetry-api is missing: pip install 'wove[otel]'")
            _setup_state.append(False)
        else:
            _setup_state.append(True)
    return _setup_state[0]


def start_worker_span(payload: Mapping[str, Any]) -> WorkerSpan | None:
    """Continue the payload's trace with a span around the task; ``None`` when there is nothing to continue."""
    carrier = payload.get("trace_context")
    if not isinstance(carrier, Mapping) or not _opentelemetry_ready():
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        headers = {key: carrier[key] for key in CONTEXT_KEYS if isinstance(carrier.get(key), str)}
        parent = TraceContextTextMapPropagator().extract(headers)
        if not trace.get_current_span(parent).get_span_context().is_valid:
            logger.debug("run %r: ignoring an invalid trace context %r", payload.get("run_id"), carrier)
            return None
        task_name = str(payload.get("task_name"))
        span = trace.get_tracer(TRACER_NAME).start_span(
            f"wove.task {task_name}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={
                "wove.task.name": task_name,
                "wove.run_id": str(payload.get("run_id")),
                "wove.adapter": str(payload.get("adapter")),
                "wove.worker.host": socket.gethostname(),
                "wove.worker.pid": os.getpid(),
            },
        )
        if not span.is_recording():  # no SDK set up here, or not sampled: nothing to report or nest under
            span.end()
            return None
        return WorkerSpan(span, trace.set_span_in_context(span, parent))
    except Exception:
        logger.warning("could not continue the trace of run %r", payload.get("run_id"), exc_info=True)
        return None
