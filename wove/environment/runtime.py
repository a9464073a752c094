"""The executor runtime: one event loop thread per process that owns every environment's executor.

Weaves run in whatever thread and loop their caller has; executors (callback servers, client pools, worker
processes) must live in one loop and outlive any single weave. So the runtime keeps them on its own daemon
thread, started on first use, and weaves hand it ``RunRequest`` objects through thread-safe futures.
A second weave that uses a started environment pays nothing to start it again.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import threading
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wove._types import Frame
from wove.config import Settings, current_settings, on_change
from wove.environment.base import EnvironmentExecutor
from wove.environment.event_loop import new_runtime_loop
from wove.environment.local import LocalEnvironmentExecutor
from wove.environment.runs import PendingRun, Requeue, RunRequest, RunTable, orphaned_error
from wove.errors import BackendUnavailableError, ConfigError, SubmitError, WoveError

logger = logging.getLogger("wove.runtime")

#: Seconds a cancelled weave waits for a ``require_ack`` environment to confirm the cancellation.
CANCEL_ACK_TIMEOUT = 30.0
#: Seconds ``shutdown`` gives each executor to stop.
STOP_TIMEOUT = 30.0


def create_executor(environment: str, spec: Any) -> EnvironmentExecutor:
    """Turn an environment's ``executor`` setting into an executor instance."""
    if isinstance(spec, EnvironmentExecutor):
        return spec
    if spec == "local":
        return LocalEnvironmentExecutor()
    if isinstance(spec, str):
        from wove.environment.remote import BackendAdapterEnvironmentExecutor

        return BackendAdapterEnvironmentExecutor(environment)
    made = spec() if callable(spec) else None
    if not isinstance(made, EnvironmentExecutor):
        raise ConfigError(
            f"environment {environment!r}: executor must be a name, an EnvironmentExecutor subclass or instance, "
            f"or a factory returning one; got {spec!r}"
        )
    return made


class _InFlight:
    """Counts an environment's in-flight runs; a run with limit N waits until fewer than N are in flight."""

    def __init__(self) -> None:
        self.count = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, limit: int | None) -> None:
        while limit is not None and self.count >= limit:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((limit, waiter))
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove((limit, waiter))
        self.count += 1

    def try_acquire(self, limit: int | None) -> bool:
        """Take a slot without waiting when one is free and nobody queues for one."""
        if self._waiters or (limit is not None and self.count >= limit):
            return False
        self.count += 1
        return True

    def release(self) -> None:
        self.count -= 1
        for limit, waiter in self._waiters:
            if not waiter.done() and self.count < limit:
                waiter.set_result(None)
                break


@dataclass
class _Environment:
    name: str
    definition: Mapping[str, Any]
    executor: EnvironmentExecutor
    in_flight: _InFlight = field(default_factory=_InFlight)
    starting: asyncio.Task[None] | None = None
    receiver: asyncio.Task[None] | None = None
    stopped: bool = False
    #: The executor overrides ``send_nowait``: runs go to it without a task each (see ``ExecutorRuntime._submit_now``).
    sends_nowait: bool = False

    @property
    def ready(self) -> bool:
        """Started successfully and not stopped since."""
        started = self.starting
        if self.stopped or started is None or not started.done() or started.cancelled():
            return False
        return started.exception() is None


class RunHandle:
    """One submitted run, shared by the weave's thread and the runtime's.

    ``future`` lives in the weave's loop and gets the outcome. On the runtime side either ``task`` runs the
    dispatch, or (the common case) ``run`` is pending with a callback that ends the handle, and no task exists.
    ``finished`` is created by the weave when it cancels, and is set once the runtime is done with the run.
    """

    __slots__ = ("done", "env", "finished", "future", "loop", "request", "run", "task")

    def __init__(self, request: RunRequest, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> None:
        self.request = request
        self.loop = loop
        self.future = future
        self.task: asyncio.Task[None] | None = None
        self.run: PendingRun | None = None
        self.env: _Environment | None = None
        self.finished: asyncio.Future[None] | None = None
        self.done = False


def _settle(handle: RunHandle, result: Any, error: BaseException | None) -> None:
    """In the weave's loop: deliver the outcome, and release a weave waiting for a cancellation to finish."""
    if not handle.future.done():
        if isinstance(error, asyncio.CancelledError):
            handle.future.cancel()
        elif error is not None:
            handle.future.set_exception(error)
        else:
            handle.future.set_result(result)
    if handle.finished is not None and not handle.finished.done():
        handle.finished.set_result(None)


class ExecutorRuntime:
    """Multiplexes runs from every weave over the environments' executors."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._environments: dict[str, _Environment] = {}
        self._runs = RunTable(self._send_cancel_soon, self._forget)
        # Submissions from weave threads queue here; one wake-up of the runtime loop drains a whole burst.
        self._inbox: deque[RunHandle] = deque()
        self._inbox_lock = threading.Lock()

    # -- thread and loop ----------------------------------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is not None:
                return self._loop
            loop = new_runtime_loop()
            ready = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            thread = threading.Thread(target=serve, name="wove-runtime", daemon=True)
            thread.start()
            ready.wait()
            self._loop, self._thread = loop, thread
            return loop

    @property
    def started_environments(self) -> tuple[str, ...]:
        """Names of the environments whose executors are running."""
        return tuple(name for name, env in self._environments.items() if env.starting and env.starting.done())

    def submit(self, request: RunRequest, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> RunHandle:
        """Hand one run to its environment; thread-safe, returns at once. The outcome lands in ``future``,
        which belongs to ``loop`` (the weave's)."""
        runtime_loop = self._ensure_loop()
        handle = RunHandle(request, loop, future)
        with self._inbox_lock:
            first = not self._inbox
            self._inbox.append(handle)
        if first:
            runtime_loop.call_soon_threadsafe(self._drain)
        return handle

    def cancel(self, handle: RunHandle) -> None:
        """Thread-safe: the weave gave up on ``handle``; its ``finished`` future is set once cancelled."""
        loop = self._loop
        if loop is None or loop.is_closed():
            _reply(handle, None, asyncio.CancelledError())
            return
        loop.call_soon_threadsafe(self._cancel_handle, handle)

    def _drain(self) -> None:
        with self._inbox_lock:
            handles = list(self._inbox)
            self._inbox.clear()
        loop = asyncio.get_running_loop()
        for handle in handles:
            if not self._submit_now(handle):
                handle.task = loop.create_task(self._dispatch(handle))

    def _cancel_handle(self, handle: RunHandle) -> None:
        if handle.task is not None and not handle.done:
            handle.task.cancel()
        elif handle.run is not None and handle.env is not None and not handle.done:
            run, env = handle.run, handle.env
            handle.run = None  # the callback on the run's future now leaves the ending to this task
            handle.task = asyncio.get_running_loop().create_task(self._cancel_submitted(handle, env, run))
        else:
            _reply(handle, None, asyncio.CancelledError())

    def call(self, coro: Any, timeout: float | None = None) -> Any:
        """Run a coroutine on the runtime loop from another thread and wait for it."""
        loop = self._ensure_loop()
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    # -- environments -------------------------------------------------------------------------------------------

    async def _environment(self, name: str) -> _Environment:
        env = self._environments.get(name)
        if env is not None and env.ready:
            return env  # the common case: no awaiting, no shield
        if env is None or env.stopped:
            settings = current_settings()
            definition = settings.environment(name)
            env = _Environment(name, definition, create_executor(name, definition.get("executor", "local")))
            self._environments[name] = env
            env.starting = asyncio.get_running_loop().create_task(self._start(env, settings))
        assert env.starting is not None
        await asyncio.shield(env.starting)
        return env

    async def _start(self, env: _Environment, settings: Settings) -> None:
        run_config = {"default_environment": settings.default_environment, "defaults": dict(settings.defaults)}
        config = dict(env.definition)
        config.setdefault("executor_config", {})
        try:
            await env.executor.start(environment_name=env.name, environment_config=config, run_config=run_config)
        except BaseException as exc:
            env.stopped = True
            if self._environments.get(env.name) is env:
                del self._environments[env.name]
            with contextlib.suppress(Exception):
                await env.executor.stop()
            if isinstance(exc, (WoveError, ValueError, ImportError, asyncio.CancelledError)):
                raise
            raise BackendUnavailableError(
                f"environment {env.name!r} failed to start: {type(exc).__name__}: {exc}", environment=env.name
            ) from exc
        env.executor.deliver_to(functools.partial(self._on_frame, env.name))
        env.sends_nowait = type(env.executor).send_nowait is not EnvironmentExecutor.send_nowait
        env.receiver = asyncio.get_running_loop().create_task(self._receive(env))
        logger.debug("environment %r started", env.name)

    def _on_frame(self, environment: str, frame: Frame) -> None:
        try:
            self._runs.on_frame(environment, frame)
        except Exception:
            logger.exception("environment %r: error while handling a frame; the frame was dropped", environment)

    async def _receive(self, env: _Environment) -> None:
        while True:
            try:
                frame = await env.executor.recv()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.error("environment %r: executor failed while receiving: %r", env.name, exc)
                why = f"its executor failed ({type(exc).__name__}: {exc})"
                await self._stop_environment(env, why, may_requeue=True)
                return
            self._on_frame(env.name, frame)

    def _retire(self, env: _Environment, why: str, *, may_requeue: bool) -> None:
        """Take an environment out of service; its pending runs meet their orphan policy."""
        for run in self._runs.pending(env.name):  # before retiring, so "cancel" can still reach the executor
            self._runs.orphan(run, orphaned_error(run, why), may_requeue=may_requeue)
        env.stopped = True
        if self._environments.get(env.name) is env:
            del self._environments[env.name]

    async def _stop_environment(self, env: _Environment, why: str, *, may_requeue: bool) -> None:
        self._retire(env, why, may_requeue=may_requeue)
        if env.starting is not None and not env.starting.done():
            env.starting.cancel()
        try:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(env.executor.send({"type": "shutdown"}), STOP_TIMEOUT)
            await asyncio.wait_for(env.executor.stop(), STOP_TIMEOUT)
        except Exception as exc:
            logger.warning("environment %r did not stop cleanly: %r", env.name, exc)
        if env.receiver is not None and env.receiver is not asyncio.current_task():
            env.receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await env.receiver

    async def stop_environments(self, names: list[str] | None = None, *, why: str = "wove shut down") -> None:
        """Stop some (default: all) environments; each pending run meets its orphan policy."""
        chosen = [env for name, env in list(self._environments.items()) if names is None or name in names]
        may_requeue = names is not None
        await asyncio.gather(*(self._stop_environment(env, why, may_requeue=may_requeue) for env in chosen))

    # -- runs -----------------------------------------------------------------------------------------------------

    def _forget(self, run: PendingRun) -> None:
        env = self._environments.get(run.request.environment)
        if env is not None and not env.stopped:
            env.executor.forget(run.run_id)

    def _send_cancel_soon(self, run: PendingRun) -> asyncio.Task[None] | None:
        """Start sending ``cancel_task`` for ``run`` (policies call this from plain callbacks)."""
        run.cancel_requested = True
        env = self._environments.get(run.request.environment)
        if env is None or env.stopped:
            return None
        frame = {"type": "cancel_task", "run_id": run.run_id, "task_id": run.request.task_id}
        task = asyncio.get_running_loop().create_task(env.executor.send(frame))
        task.add_done_callback(_log_failure)
        return task

    def _submit_now(self, handle: RunHandle) -> bool:
        """Submit without a task when the environment is started, has room and takes runs synchronously (most runs).

        The run's future then ends the handle from a callback: no task, no shield, one loop callback per outcome.
        Returns ``False`` to leave the run to :meth:`_dispatch` (environment starting, in-flight limit reached).
        """
        request = handle.request
        env = self._environments.get(request.environment)
        if env is None or not env.sends_nowait or not env.ready:
            return False
        if not env.in_flight.try_acquire(request.delivery.get("max_in_flight")):
            return False
        run = self._runs.open(request)
        try:
            env.executor.send_nowait(run.frame())
        except Exception as exc:
            env.in_flight.release()
            self._end(handle, None, self._refused(env, run, exc))
            return True
        handle.run, handle.env = run, env
        run.future.add_done_callback(functools.partial(self._submitted_ended, handle, env))
        return True

    def _submitted_ended(self, handle: RunHandle, env: _Environment, future: asyncio.Future[Any]) -> None:
        """The outcome of a run submitted by :meth:`_submit_now` (unless a cancellation took the handle over)."""
        if handle.run is None:
            return  # _cancel_submitted owns the ending
        handle.run = None
        env.in_flight.release()
        if future.cancelled():
            self._end(handle, None, asyncio.CancelledError())
            return
        error = future.exception()
        if isinstance(error, Requeue):  # lost, and the policy says submit again: the task path does that
            handle.task = asyncio.get_running_loop().create_task(self._dispatch(handle))
            return
        self._end(handle, None if error is not None else future.result(), error)

    async def _cancel_submitted(self, handle: RunHandle, env: _Environment, run: PendingRun) -> None:
        try:
            if not run.future.done():
                await self._cancel(run)
        finally:
            env.in_flight.release()
            self._end(handle, None, asyncio.CancelledError())

    async def _dispatch(self, handle: RunHandle) -> None:
        request = handle.request
        result: Any = None
        error: BaseException | None = None
        try:
            while True:
                env = await self._environment(request.environment)
                await env.in_flight.acquire(request.delivery.get("max_in_flight"))
                try:
                    result = await self._run_once(env, request)
                    break
                except Requeue:
                    continue
                finally:
                    env.in_flight.release()
        except BaseException as exc:  # the outcome travels to the weave; nobody awaits this task
            error = exc
        self._end(handle, result, error)

    @staticmethod
    def _end(handle: RunHandle, result: Any, error: BaseException | None) -> None:
        request = handle.request
        if error is not None and request.record.status == "pending" and not isinstance(error, asyncio.CancelledError):
            request.record.status = "failed"  # the environment never took the run (it could not start)
            request.record.error = error
        handle.done = True
        _reply(handle, result, error)

    def _refused(self, env: _Environment, run: PendingRun, exc: Exception) -> SubmitError:
        """The executor did not take the run: close it and say so."""
        request = run.request
        self._runs.close(run)
        request.record.status = "failed"
        if isinstance(exc, SubmitError):
            return exc
        error = SubmitError(
            f"environment {env.name!r} did not accept task {request.task_name!r}: {type(exc).__name__}: {exc}",
            environment=env.name,
            run_id=run.run_id,
        )
        error.__cause__ = exc
        return error

    async def _run_once(self, env: _Environment, request: RunRequest) -> Any:
        run = self._runs.open(request)
        try:
            await env.executor.send(run.frame())
        except Exception as exc:
            raise self._refused(env, run, exc)  # noqa: B904 - _refused keeps exc as the cause when it wraps it
        try:
            return await asyncio.shield(run.future)
        except asyncio.CancelledError:
            if run.future.done():
                raise
            await self._cancel(run)
            raise

    async def _cancel(self, run: PendingRun) -> None:
        """The weave gave up on this run: tell the executor, and wait for the ack if the policy requires one."""
        sending = self._send_cancel_soon(run)
        if sending is not None:  # the cancel has left when the weave hears back, in either mode
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(sending), CANCEL_ACK_TIMEOUT)
        if run.request.delivery.get("cancel_mode") == "require_ack":
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(run.future), CANCEL_ACK_TIMEOUT)
            if not run.future.done():
                logger.warning("run %s of task %r: no cancel acknowledgement", run.run_id, run.request.task_name)
        run.request.record.status = "cancelled"
        self._runs.close(run)
        if not run.future.done():
            run.future.cancel()

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop every environment and the runtime thread; the next run starts them again."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        if thread is threading.current_thread():
            raise WoveError("wove.shutdown() cannot be called from inside a running task")
        try:
            asyncio.run_coroutine_threadsafe(self.stop_environments(), loop).result(STOP_TIMEOUT * 2)
        except Exception as exc:
            logger.warning("environments did not stop cleanly: %r", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_TIMEOUT)
        if not thread.is_alive():
            loop.close()
        self._environments.clear()

    def _config_changed(self, old: Settings, new: Settings) -> None:
        changed = [name for name in self._environments if old.environments.get(name) != new.environments.get(name)]
        loop = self._loop
        if changed and loop is not None:
            asyncio.run_coroutine_threadsafe(
                self.stop_environments(changed, why="its configuration changed"), loop
            ).add_done_callback(_log_failure)


class _Replies:
    """Outcomes on their way to the weaves' loops: one wake-up of a loop per batch of outcomes, not one per run.

    A mapped task's runs finish in bursts; waking the weave's loop (a pipe write and a loop iteration) once per
    burst keeps the weave's thread from spending its time on wake-ups.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[_Outcome]] = (
            weakref.WeakKeyDictionary()
        )

    def send(self, handle: RunHandle, result: Any, error: BaseException | None) -> None:
        loop = handle.loop
        with self._lock:
            batch = self._batches.get(loop)
            first = batch is None
            if batch is None:
                batch = self._batches[loop] = []
            batch.append((handle, result, error))
        if first:
            try:
                loop.call_soon_threadsafe(self._deliver, loop)
            except RuntimeError:  # the loop has closed: that weave no longer listens
                with self._lock:
                    self._batches.pop(loop, None)

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            batch = self._batches.pop(loop, [])
        for handle, result, error in batch:
            _settle(handle, result, error)


_Outcome = tuple[RunHandle, Any, "BaseException | None"]
_replies = _Replies()


def _reply(handle: RunHandle, result: Any, error: BaseException | None) -> None:
    """Send an outcome to the weave's loop; a weave whose loop has closed no longer listens."""
    _replies.send(handle, result, error)


def _log_failure(future: Any) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        logger.warning("background runtime operation failed: %r", exc)


_runtime = ExecutorRuntime()
on_change(_runtime._config_changed)
atexit.register(_runtime.shutdown)


def get_runtime() -> ExecutorRuntime:
    """The process-wide runtime."""
    return _runtime


def shutdown() -> None:
    """Stop every started environment (pending runs meet their orphan policy) and the runtime thread."""
    _runtime.shutdown()
