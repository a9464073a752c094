"""Worker entrypoints: run a backend payload where the backend placed it and report back to the weave.

Both entrypoints load the callable and arguments (fetching by-reference blobs with the run credential), post
``task_started``, run the callable while posting a ``heartbeat`` every third of ``delivery["heartbeat_seconds"]``,
then post ``task_result``, ``task_error`` or ``task_cancelled``.

The synchronous entrypoint, when it runs in the main thread, also turns SIGTERM (a scheduler cancelling the job) into
``task_cancelled``: the callable then runs in a helper thread, so the main thread can keep posting heartbeats and
react to the signal, and after posting the previous handler runs and the process exits with status 143.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from _queue import SimpleQueue  # the C queue itself: queue.py would import heapq too
from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import signal
else:
    try:  # the C module: signal.py turns every constant into an enum member at import (a cold worker's 1-2 ms)
        import _signal as signal
    except ImportError:  # pragma: no cover - not CPython
        import signal

from wove.backend import codec
from wove.backend.client import CallbackConnection
from wove.backend.delivery import env_seconds
from wove.errors import BackendUnavailableError, CallbackError, PayloadError

if TYPE_CHECKING:
    import logging

    from wove.backend.aclient import AsyncCallbackConnection
    from wove.backend.outbox import Outbox
    from wove.tracing import WorkerSpan

__all__ = ["run_backend_payload", "run_backend_payload_async"]

#: Heartbeats posted per ``heartbeat_seconds`` window (the submitting side presumes a worker dead after one window).
HEARTBEATS_PER_WINDOW = 3
MIN_HEARTBEAT_INTERVAL = 0.01
#: Environment variable: seconds to deliver ``task_cancelled`` after SIGTERM (schedulers kill soon after).
CANCEL_DEADLINE_ENV = "WOVE_CANCEL_DEADLINE"
DEFAULT_CANCEL_DEADLINE = 5.0
#: The async entrypoint unpickles bodies larger than this in a thread, keeping the event loop free.
OFFLOAD_BYTES = 1 << 20
#: Exit status after SIGTERM, as a shell reports a process killed by it.
EXIT_SIGTERM = 128 + signal.SIGTERM
#: How ``run_payload`` posts ``task_started``: wait for the answer, pipeline it, or only if the run lasts.
START_WAIT, START_PIPELINED, START_LAZY = "wait", "pipelined", "lazy"
#: A lazily started run that lasts this many seconds gets its ``task_started`` (checked every ``LAZY_START_POLL``).
LAZY_START_AFTER = 0.05
LAZY_START_POLL = 0.025


def _logger() -> logging.Logger:
    import logging

    return logging.getLogger(__name__)


class _Job:
    """The validated fields of a payload and the frames it produces."""

    def __init__(self, payload: Mapping[str, Any]) -> None:
        codec.validate_payload(payload)
        self.payload = payload
        self.run_id: str = payload["run_id"]
        self.task_id: Any = payload.get("task_id")
        self.task_name: str = payload["task_name"]
        self.callback_url: str = payload["callback_url"]
        #: The callback server's Unix socket when it runs on this host (the ``process`` pool): cheaper than TCP.
        self.unix_socket: str | None = payload.get("callback_socket") or None
        #: Stamped on every frame: the callback server refuses a second execution of a started run (duplicates).
        self.execution = os.urandom(8).hex()
        seconds = (payload.get("delivery") or {}).get("heartbeat_seconds")
        self.interval: float | None = None
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds > 0:
            self.interval = max(seconds / HEARTBEATS_PER_WINDOW, MIN_HEARTBEAT_INTERVAL)
        #: Fields every later frame carries (a lazily started run's start, in its terminal frame).
        self.extra: dict[str, Any] = {}

    def frame(self, kind: str, **fields: Any) -> dict[str, Any]:
        """An event frame of this run; ``at`` is the worker's clock (the submitting side may stamp timings with it)."""
        frame = {"type": kind, "run_id": self.run_id, "task_id": self.task_id, "at": time.time()}
        frame["execution"] = self.execution
        return {**frame, **self.extra, **fields}

    def started(self) -> dict[str, Any]:
        return self.frame("task_started", host=_hostname(), pid=os.getpid())

    def failed(self, exc: BaseException, source: str) -> dict[str, Any]:
        return self.frame("task_error", exception=exc, error=codec.error_info(exc, source=source))

    def body_fields(self) -> list[tuple[str, Any, str]]:
        return [
            ("callable_pickle", self.payload["callable_pickle"], f"the callable of task {self.task_name!r}"),
            ("args_pickle", self.payload["args_pickle"], f"the arguments of task {self.task_name!r}"),
        ]

    def checked(self, fn: Any, kwargs: Any) -> tuple[Callable[..., Any], dict[str, Any]]:
        if not callable(fn) or not isinstance(kwargs, dict):
            raise PayloadError(f"payload of task {self.task_name!r} does not hold a callable and a keyword dict")
        return fn, kwargs


_host: list[str] = []


def _hostname() -> str:
    if not _host:
        _host.append(socket.gethostname())
    return _host[0]


#: Unpickled callables of recent runs, by their pickle's base64 text (see :func:`_load_callable`).
_callables: OrderedDict[str, Any] = OrderedDict()
_callables_lock = threading.Lock()
CALLABLE_CACHE_SIZE = 64
#: Pickles longer than this (base64 characters) are not cached.
CALLABLE_CACHE_TEXT = 64 * 1024


def _load_callable(conn: CallbackConnection, field: Any, what: str) -> Any:
    """Load a run's callable, reusing the object unpickled for an earlier run with the very same pickle.

    A mapped task sends one pickle per item; unpickling a function by value builds its code object and globals
    each time. Reusing the object means a long-lived worker keeps a by-value function's globals and closure
    between runs of the same pickle, exactly as it keeps an importable function's module state.
    """
    fn = _cached_callable(field)
    if fn is None:
        fn = _load_sync(conn, field, what)
        _cache_callable(field, fn)
    return fn


def _cached_callable(field: Any) -> Any:
    if not isinstance(field, str):
        return None
    with _callables_lock:
        fn = _callables.get(field)
        if fn is not None:
            _callables.move_to_end(field)
    return fn


def _cache_callable(field: Any, fn: Any) -> None:
    if isinstance(field, str) and len(field) <= CALLABLE_CACHE_TEXT and callable(fn):
        with _callables_lock:
            _callables[field] = fn
            if len(_callables) > CALLABLE_CACHE_SIZE:
                _callables.popitem(last=False)


class _Outcome(NamedTuple):
    ok: bool
    value: Any


class _Terminated(BaseException):
    """Raised by the SIGTERM handler to interrupt the main thread's wait."""


def _call(fn: Callable[..., Any], kwargs: dict[str, Any]) -> _Outcome:
    """Call ``fn``; afterwards drop our hold on the arguments so a large input is freed before the result pickles."""
    try:
        try:
            value = fn(**kwargs)
        finally:
            kwargs.clear()
        if hasattr(value, "__await__"):
            import asyncio

            async def wait() -> Any:
                return await value

            value = asyncio.run(wait())
        return _Outcome(True, value)
    except Exception as exc:
        return _Outcome(False, exc)


class _Helper:
    """One thread kept for the main thread's runs, so a long-lived worker does not start a thread per task."""

    def __init__(self) -> None:
        self.jobs: SimpleQueue[Callable[[], None]] = SimpleQueue()
        self.busy = False
        self.thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> bool:
        """Run ``job`` on the helper; ``False`` when it is still busy (an abandoned task), so the caller must not."""
        if self.busy:
            return False
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._serve, name="wove-task", daemon=True)
            self.thread.start()
        self.busy = True
        self.jobs.put(job)
        return True

    def _serve(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                job()
            finally:
                self.busy = False


_helper = _Helper()


def _refuse_running_loop() -> None:
    asyncio = sys.modules.get("asyncio")  # no asyncio imported: no loop can be running, and no import cost
    if asyncio is not None and asyncio.events._get_running_loop() is not None:
        raise RuntimeError(
            "run_backend_payload() cannot run inside a running event loop; use await run_backend_payload_async()"
        )


# -- synchronous ------------------------------------------------------------------------------------------------------


def run_backend_payload(payload: Mapping[str, Any]) -> Any:
    """Synchronous worker entrypoint for backend workers.

    Returns the callable's result after posting ``task_result``; re-raises its exception after posting
    ``task_error``. Raises :class:`PayloadError` for a payload it cannot run and :class:`CallbackError` when the
    callback server refuses the run or cannot be reached before the deadline.
    """
    return run_payload(payload, RunTrace())


class RunTrace:
    """What a run got to; lets the CLI tell the task's own exception from a transport failure."""

    def __init__(self) -> None:
        self.task_name = ""
        self.task_exception: BaseException | None = None


def run_payload(
    payload: Mapping[str, Any],
    trace: RunTrace,
    *,
    start: str = START_WAIT,
    sigterm: bool = True,
    outbox: Outbox | None = None,
) -> Any:
    """:func:`run_backend_payload`, recording in ``trace`` the exception the task itself raised (if any).

    ``start`` says how ``task_started`` goes out:

    * ``"wait"`` (the default): posted, and the task runs once the server accepted it. A refusal (the run is no
      longer pending) stops a duplicate delivery of a resolved run from running the task again.
    * ``"pipelined"``: the task starts as soon as the frame is sent; the answer is read before the next frame goes
      out, so frames stay in order and a refusal still ends the run, only after the task ran.
    * ``"lazy"``: a run that ends within ``LAZY_START_AFTER`` seconds posts no ``task_started``; its terminal frame
      carries ``started_at``, ``host`` and ``pid`` instead (the run's record takes them from it). A longer run
      gets its ``task_started`` from a watchdog thread, in order.
      Runs with heartbeats start as ``"pipelined"``.

    The last two are for backends that never deliver a payload twice (the ``process`` pool, Ray, Dask).

    ``sigterm=False`` leaves SIGTERM to the worker process's own handling even in the main thread, and runs the task
    right there instead of on a helper thread (tens of microseconds a run). For engines that end their workers
    themselves and tell the adapter (Ray); an exception their handler raises into the task still ends the run with
    ``task_cancelled``.

    ``outbox`` (with ``"lazy"``): a run without heartbeats leaves its ``task_result`` or ``task_error`` there instead
    of posting it, for its owner to flush together with other runs' (:mod:`wove.backend.outbox`); a run that
    outlasts the lazy start flushes it before its ``task_started`` goes out.
    """
    _refuse_running_loop()
    job = _Job(payload)
    trace.task_name = job.task_name
    with CallbackConnection(job.callback_url, unix_socket=job.unix_socket) as conn:
        try:
            callable_field, args_field = job.body_fields()
            fn = _load_callable(conn, callable_field[1], callable_field[2])
            fn, kwargs = job.checked(fn, _load_sync(conn, args_field[1], args_field[2]))
        except (PayloadError, BackendUnavailableError) as exc:
            _post_quietly(conn, job.failed(exc, "worker"))
            raise
        span = _continue_trace(job) if "trace_context" in payload else None
        if span is None:
            return _SyncRun(job, conn, trace, start, sigterm, outbox).run(fn, kwargs)
        try:
            return _SyncRun(job, conn, trace, start, sigterm, outbox).run(span.wrap(fn), kwargs)
        finally:
            span.abandon()  # a no-op unless the task never finished (SIGTERM, an interrupt)


def _continue_trace(job: _Job) -> WorkerSpan | None:
    """A child span of the payload's trace around the task, its ids on the run's frames (see :mod:`wove.tracing`).

    Imported only for a payload that carries a trace context: an untraced worker never loads OpenTelemetry.
    """
    from wove.tracing import start_worker_span

    span = start_worker_span(job.payload)
    if span is not None:
        job.extra.update(span.ids)
    return span


def _load_sync(conn: CallbackConnection, field: Any, what: str) -> Any:
    data = codec.b64decode(field, what) if isinstance(field, str) else conn.fetch_blob(field["ref"])
    return codec.loads(data, what)


def _post_quietly(conn: CallbackConnection, frame: Mapping[str, Any], deadline: float | None = None) -> None:
    try:
        conn.post(frame, deadline=deadline)
    except (CallbackError, PayloadError) as exc:
        _logger().warning("could not post %s frame: %s", frame.get("type"), exc)


class _LazyStart:
    """A run whose ``task_started`` is posted only if it lasts (see :func:`run_payload`)."""

    __slots__ = ("began", "done", "job", "lock", "outbox", "posted", "started_at")

    def __init__(self, job: _Job, outbox: Outbox | None) -> None:
        self.job = job
        self.outbox = outbox
        self.began = time.monotonic()
        self.started_at = time.time()
        self.lock = threading.Lock()
        self.done = False
        self.posted = False

    def post_started(self) -> None:
        """In the watchdog thread. The lock is held while posting, so the run's terminal frame waits for it."""
        with self.lock:
            if self.done or self.posted:
                return
            self.posted = True
            frame = self.job.frame("task_started", started_at=self.started_at, host=_hostname(), pid=os.getpid())
            try:
                with CallbackConnection(self.job.callback_url, unix_socket=self.job.unix_socket) as conn:
                    conn.post(frame)
            except (CallbackError, PayloadError) as exc:
                _logger().warning("could not post task_started of run %r: %s", self.job.run_id, exc)

    def finish(self) -> bool:
        """The run ended: ``True`` when its ``task_started`` went out (the terminal frame need not carry it)."""
        with self.lock:
            self.done = True
            return self.posted


def _end_lazy_start(job: _Job, lazy: _LazyStart | None) -> None:
    if lazy is not None:
        _watchdog.forget(lazy)
        if not lazy.finish():
            job.extra.update(started_at=lazy.started_at, host=_hostname(), pid=os.getpid())


class _StartWatchdog:
    """One thread per process that posts ``task_started`` for lazily started runs once they outlast the grace.

    It polls every ``LAZY_START_POLL`` seconds while runs come in and sleeps when none does, so a short run costs
    no thread wake-up at all.
    """

    def __init__(self) -> None:
        self.current: _LazyStart | None = None
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def watch(self, job: _Job, outbox: Outbox | None) -> _LazyStart:
        lazy = _LazyStart(job, outbox)
        self.current = lazy
        if not self.wake.is_set():
            self.wake.set()
        if self.thread is None or not self.thread.is_alive():
            with self.lock:
                if self.thread is None or not self.thread.is_alive():
                    self.thread = threading.Thread(target=self._serve, name="wove-start-watchdog", daemon=True)
                    self.thread.start()
        return lazy

    def forget(self, lazy: _LazyStart) -> None:
        if self.current is lazy:
            self.current = None

    def _serve(self) -> None:
        idle = 0
        while True:
            self.wake.wait()
            time.sleep(LAZY_START_POLL)
            lazy = self.current
            if lazy is None:
                idle += 1
                if idle * LAZY_START_POLL >= 1.0:  # nothing ran for a second: sleep until the next run
                    self.wake.clear()
                    if self.current is not None:
                        self.wake.set()
                    idle = 0
                continue
            idle = 0
            if not lazy.done and time.monotonic() - lazy.began >= LAZY_START_AFTER:
                if lazy.outbox is not None:  # earlier runs' outcomes need not wait for this long one
                    lazy.outbox.flush()
                lazy.post_started()


_watchdog = _StartWatchdog()


class _SyncRun:
    """One run of a payload in this thread, with heartbeats and (in the main thread) SIGTERM handling."""

    def __init__(
        self,
        job: _Job,
        conn: CallbackConnection,
        trace: RunTrace,
        start: str = START_WAIT,
        sigterm: bool = True,
        outbox: Outbox | None = None,
    ) -> None:
        self.job = job
        self.outbox = outbox
        self.sigterm = sigterm
        self.conn = conn
        self.trace = trace
        self.start = start
        self.beating = job.interval is not None
        self.handling = False
        self.previous: Any = None
        self.terminated = False
        self.armed = False
        self.signal_frame: FrameType | None = None

    def run(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        self._install()
        lazy: _LazyStart | None = None
        try:
            if self.start == START_LAZY and not self.beating and not self.handling:
                lazy = _watchdog.watch(self.job, self.outbox)
            elif self.start != START_WAIT:
                self.conn.post_unanswered(self.job.started())
            else:
                self.conn.post(self.job.started())
            try:
                outcome = None if self.terminated else self._execute(fn, kwargs)
            except _Terminated:
                outcome = None
            except BaseException:  # KeyboardInterrupt and the like: the run ends without an outcome
                _end_lazy_start(self.job, lazy)
                _post_quietly(self.conn, self.job.frame("task_cancelled"), self._cancel_deadline())
                raise
            _end_lazy_start(self.job, lazy)
            if lazy is None:
                self.outbox = None  # a run that posts its start itself posts its outcome itself too
            if outcome is None:
                _post_quietly(self.conn, self.job.frame("task_cancelled"), self._cancel_deadline())
                self._uninstall()
                if callable(self.previous):
                    self.previous(signal.SIGTERM, self.signal_frame)
                raise SystemExit(EXIT_SIGTERM)
            return self._report(outcome)
        finally:
            self._uninstall()

    def _report(self, outcome: _Outcome) -> Any:
        if not outcome.ok:
            self._post_outcome(self.job.failed(outcome.value, "task"))
            self.trace.task_exception = outcome.value
            raise outcome.value
        try:
            self._post_outcome(self.job.frame("task_result", result=outcome.value))
        except PayloadError as exc:  # the result cannot be pickled
            self.conn.post(self.job.failed(exc, "worker"))
            raise
        if self.terminated:  # SIGTERM came while the result was being posted: honour it now
            self._uninstall()
            signal.raise_signal(signal.SIGTERM)
        return outcome.value

    def _post_outcome(self, frame: Mapping[str, Any]) -> None:
        if self.outbox is not None:
            self.outbox.deliver(self.conn, frame)
        else:
            self.conn.post(frame)

    def _execute(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> _Outcome | None:
        """Run the callable; ``None`` when SIGTERM ended the wait."""
        if not self.handling and not self.beating:
            return _call(fn, kwargs)
        box: list[_Outcome] = []
        done = threading.Event()

        def target() -> None:
            try:
                box.append(_call(fn, kwargs))
            except BaseException as exc:  # SystemExit and friends end only this thread; report them
                box.append(_Outcome(False, exc))
            done.set()

        if not (self.handling and _helper.submit(target)):
            threading.Thread(target=target, name=f"wove-task-{self.job.task_name}", daemon=True).start()
        while True:
            try:
                self.armed = True
                if self.terminated:
                    return None
                finished = done.wait(self.job.interval if self.beating else None)
            finally:
                self.armed = False
            if finished:
                return box[0]
            if self.beating:
                self._heartbeat()

    def _heartbeat(self) -> None:
        interval = self.job.interval or 1.0
        try:
            self.conn.post(self.job.frame("heartbeat"), deadline=max(interval, 1.0))
        except CallbackError as exc:
            if exc.reason == "run_not_pending":
                _logger().info("run %r was closed by the submitting side; no more heartbeats", self.job.run_id)
                self.beating = False
            else:
                _logger().warning("heartbeat not delivered: %s", exc)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.terminated = True
        self.signal_frame = frame
        if self.armed:
            raise _Terminated

    def _install(self) -> None:
        if not self.sigterm or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if previous == signal.SIG_IGN:
            return
        self.previous = previous
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.handling = True

    def _uninstall(self) -> None:
        if self.handling:
            signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)
            self.handling = False

    @staticmethod
    def _cancel_deadline() -> float:
        return env_seconds(CANCEL_DEADLINE_ENV, DEFAULT_CANCEL_DEADLINE)


# -- asynchronous -----------------------------------------------------------------------------------------------------


async def run_backend_payload_async(payload: Mapping[str, Any]) -> Any:
    """Execute a backend payload and deliver the result to its callback URL.

    Coroutine functions are awaited; plain callables run in a thread so heartbeats keep flowing. Cancelling this
    coroutine cancels the task and posts ``task_cancelled``. Runs on one event loop share keep-alive connections
    to the callback server.
    """
    import asyncio

    from wove.backend.aclient import AsyncCallbackConnection

    job = _Job(payload)
    async with AsyncCallbackConnection(job.callback_url, unix_socket=job.unix_socket) as conn:
        try:
            (_, callable_field, callable_what), (_, args_field, args_what) = job.body_fields()
            fn = _cached_callable(callable_field)
            if fn is None:
                fn = await _load_async(conn, callable_field, callable_what)
                _cache_callable(callable_field, fn)
            fn, kwargs = job.checked(fn, await _load_async(conn, args_field, args_what))
        except (PayloadError, BackendUnavailableError) as exc:
            await _apost_quietly(conn, job.failed(exc, "worker"))
            raise
        span = _continue_trace(job) if "trace_context" in payload else None
        if span is not None:
            fn = span.wrap(fn)  # ends the span as the task ends, cancellation included
        await conn.post(job.started())
        task = asyncio.ensure_future(_acall(fn, kwargs))
        interval = job.interval
        try:
            while not (await asyncio.wait({task}, timeout=interval))[0]:
                if not await _aheartbeat(conn, job):
                    interval = None
            value = task.result()
        except asyncio.CancelledError:
            task.cancel()
            await _apost_quietly(
                conn, job.frame("task_cancelled"), env_seconds(CANCEL_DEADLINE_ENV, DEFAULT_CANCEL_DEADLINE)
            )
            raise
        except Exception as exc:
            await conn.post(job.failed(exc, "task"))
            raise
        try:
            await conn.post(job.frame("task_result", result=value))
        except PayloadError as exc:
            await conn.post(job.failed(exc, "worker"))
            raise
        return value


async def _load_async(conn: AsyncCallbackConnection, field: Any, what: str) -> Any:
    import asyncio

    data = codec.b64decode(field, what) if isinstance(field, str) else await conn.fetch_blob(field["ref"])
    if len(data) > OFFLOAD_BYTES:
        return await asyncio.to_thread(codec.loads, data, what)
    return codec.loads(data, what)


async def _acall(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    import asyncio
    import inspect

    try:
        if inspect.iscoroutinefunction(fn):
            return await fn(**kwargs)
        value = await asyncio.to_thread(fn, **kwargs)
    finally:
        kwargs.clear()  # free a large input before the result is pickled
    if inspect.isawaitable(value):
        value = await value
    return value


async def _aheartbeat(conn: AsyncCallbackConnection, job: _Job) -> bool:
    """Post one heartbeat; ``False`` once the submitting side has closed the run (stop beating)."""
    try:
        await conn.post(job.frame("heartbeat"), deadline=max(job.interval or 1.0, 1.0))
    except CallbackError as exc:
        if exc.reason == "run_not_pending":
            _logger().info("run %r was closed by the submitting side; no more heartbeats", job.run_id)
            return False
        _logger().warning("heartbeat not delivered: %s", exc)
    return True


async def _apost_quietly(
    conn: AsyncCallbackConnection, frame: Mapping[str, Any], deadline: float | None = None
) -> None:
    try:
        await conn.post(frame, deadline=deadline)
    except (CallbackError, PayloadError) as exc:
        _logger().warning("could not post %s frame: %s", frame.get("type"), exc)
