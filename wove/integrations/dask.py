"""``DaskAdapter``: runs payloads as tasks on a Dask distributed cluster. Workers need wove installed, nothing else.

Each payload becomes one Dask task calling :func:`run_payload` (wove's worker entrypoint) under the key
``wove-<task name>-<run id>``: keys never collide (``pure=False`` semantics) and the dashboard groups runs by task.

The client is synchronous: it runs its own IO loop on a thread of its own, so the scheduler's messages never take
turns with the weave's callbacks on the runtime loop. Submissions go through that client from a worker thread, in
batches (one ``Client.map`` per batch, a single scheduler message); cancels too, as they wait for the scheduler.

Dask cannot interrupt a running thread, so a cancelled task's function runs to its end on its worker; the weave has
already seen ``CancelledError`` and the late frames are refused. A task whose worker dies is rescheduled by Dask
within milliseconds; wove does not wait for that rerun: it ends the run at once with ``DeliveryLostError`` (it watches
the scheduler's ``remove-worker`` events) and releases the key, so the task's ``retries`` decide whether it runs again
(as a new run). A rerun Dask had already started runs to its end like a cancelled task.

Config keys (``executor_config``): ``client`` (an existing synchronous ``distributed.Client``, used as is and never
closed) or ``address`` (a scheduler address; wove connects its own client), ``client_options`` (keyword arguments
for that ``Client``), ``submit_options`` (``workers``, ``resources``, ``priority``, ``allow_other_workers``,
``fifo_timeout``: passed to ``Client.map``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from wove._types import Frame
from wove.errors import BackendUnavailableError, ConfigError, DeliveryLostError, WoveError
from wove.integrations._batching import BatchSubmitter, call_blocking
from wove.integrations.base import BackendAdapter

__all__ = ["DaskAdapter", "DaskSubmission"]

logger = logging.getLogger("wove.integrations.dask")

#: ``Client.submit``/``Client.map`` options users may set; the rest are wove's (``key``, ``pure``) or would break
#: the one-run-one-execution contract (``retries``: use the task's ``retries``, each attempt a new run).
SUBMIT_OPTIONS = frozenset({"workers", "resources", "priority", "allow_other_workers", "fifo_timeout"})
#: Every key starts with this, so the scheduler's events can be matched to runs cheaply.
KEY_PREFIX = "wove-"
#: The scheduler topic that announces removed workers and the keys they were processing.
EVENT_TOPIC = "all"
#: Seconds to wait for the scheduler in ``close`` (releasing keys) and for a failed key's exception.
SCHEDULER_TIMEOUT = 10.0


@dataclass(frozen=True)
class DaskSubmission:
    """The Dask key of one run; the weave's records show it as the run's ``submission``."""

    key: str

    def __str__(self) -> str:
        return self.key


@dataclass(eq=False)
class _Job:
    run_id: str
    task_id: Any
    future: Any = None  # the distributed.Future, once the scheduler has the task


class DaskAdapter(BackendAdapter):
    """Submits payloads to a Dask scheduler through a synchronous ``distributed.Client``."""

    backend: ClassVar[str] = "dask"
    required_modules: ClassVar[tuple[str, ...]] = ("distributed",)
    install_hint: ClassVar[str] = "pip install 'wove[dask]'"
    #: The scheduler keeps every queued task's arguments in memory and relays them to a worker; bodies above 32 KiB
    #: are fetched by the worker from the callback server instead.
    inline_payload_limit: ClassVar[int | None] = 32 * 1024

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        given, address = self.config.get("client"), self.config.get("address")
        if (given is None) == (not address):
            raise ConfigError(
                f"environment {self.name!r}: the dask executor needs executor_config['client'] (a distributed.Client)"
                " or executor_config['address'] (a scheduler address such as 'tcp://10.0.0.5:8786'), not both"
            )
        if given is not None:
            _check_client(self.name, given)
        self.address: str | None = str(address) if address else None
        self.client_options = _options(self.name, self.config, "client_options")
        if self.client_options.get("asynchronous"):
            raise ConfigError(f"environment {self.name!r}: client_options may not set asynchronous=True")
        self.submit_options = _submit_options(self.name, self.config)
        self.client: Any = given
        self._owns_client = False
        self._jobs: dict[str, _Job] = {}
        self._submitter: BatchSubmitter[tuple[str, Frame], Any] = BatchSubmitter(self._submit_many)
        self._releasing: set[asyncio.Task[None]] = set()
        self._completions: _Completions | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_handler: Any = None
        self._watching = False
        self._closed = False

    # -- adapter contract ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect a client when given an address, then follow the scheduler's worker removals."""
        self._loop = asyncio.get_running_loop()
        if self.client is None:
            self.client = await self._connect()
            self._owns_client = True
        self._completions = _Completions(self.client, self._future_done, name=self.name)
        self._watch_workers()

    async def submit(self, payload: Frame, frame: Frame) -> DaskSubmission:
        """Hand the payload to the scheduler under a key of its own; returns once the client has sent it."""
        run_id = str(frame["run_id"])
        key = f"{KEY_PREFIX}{frame.get('task_name') or 'task'}-{run_id}"
        job = _Job(run_id, frame.get("task_id"))
        self._jobs[key] = job
        try:
            with self.translate_errors("submit", run_id=run_id):
                job.future = await self._submitter.submit((key, payload))
        except BaseException:
            self._jobs.pop(key, None)
            raise
        return DaskSubmission(key)

    async def cancel(self, run_id: str, submission: Any, frame: Frame) -> None:
        """Cancel the key (``force=True``). A queued task never starts; a running one finishes in its thread."""
        job = self._jobs.pop(submission.key, None) if isinstance(submission, DaskSubmission) else None
        if job is None or job.future is None:
            return  # finished, lost, or never submitted
        with self.translate_errors("cancel", run_id=run_id):
            await self.run_blocking(self.client.cancel, [job.future], force=True)

    async def close(self) -> None:
        """Cancel the keys of runs still pending, stop following events, close the client if wove made it."""
        if self._closed:
            return
        self._closed = True
        if self.client is None:
            return
        self._unwatch_workers()
        if self._completions is not None:
            self._completions.stop()
        await asyncio.gather(*self._releasing, return_exceptions=True)
        futures = [job.future for job in self._jobs.values() if job.future is not None]
        self._jobs.clear()
        if futures:
            await self._quietly(f"releasing {len(futures)} pending key(s)", self.client.cancel, futures, force=True)
        if self._owns_client:
            await self._quietly("closing the client", self.client.close, timeout=SCHEDULER_TIMEOUT)
        self.client = None

    # -- submission ------------------------------------------------------------------------------------------

    async def _connect(self) -> Any:
        def connect() -> Any:
            distributed: Any = importlib.import_module("distributed")  # typed as Any: the SDK's Client is untyped
            return distributed.Client(self.address, set_as_default=False, **self.client_options)

        try:
            return await self.run_blocking(connect)
        except WoveError:
            raise
        except Exception as exc:
            message = f"cannot connect to the Dask scheduler at {self.address!r}: {type(exc).__name__}: {exc}"
            raise BackendUnavailableError(f"environment {self.name!r}: {message}", environment=self.name) from exc

    def _submit_many(self, items: Sequence[tuple[str, Frame]]) -> list[Any]:
        """In a worker thread: one ``Client.map`` for the batch; each future is then followed to its end."""
        keys = [key for key, _ in items]
        futures = self.client.map(
            run_payload, [payload for _, payload in items], key=keys, pure=False, **self.submit_options
        )
        assert self._completions is not None
        self._completions.follow(futures)
        return list(futures)

    # -- completion and loss (news arrives on other threads; state changes happen on the runtime loop) -------

    def _future_done(self, future: Any) -> None:
        """On the completions thread: read how the key ended and pass that to the runtime loop."""
        status, error = future.status, None
        if status == "error":
            try:
                error = future.exception(timeout=SCHEDULER_TIMEOUT)
            except Exception as exc:  # the client is closing
                error = exc
        self._call_soon(self._finished, str(future.key), status, error)

    def _finished(self, key: str, status: str, error: BaseException | None) -> None:
        job = self._jobs.pop(key, None)
        if job is None or status == "finished":
            return  # cancelled or lost already, or ended normally (the worker reported its outcome)
        if status == "cancelled":  # not by wove: another client cancelled it with force=True
            logger.warning("environment %r: Dask key %s was cancelled outside wove", self.name, key)
            self.emit({"type": "task_cancelled", "run_id": job.run_id, "task_id": job.task_id})
            return
        # The task's own exception was posted before it propagated, so this report is dropped as late. Anything
        # else (wove missing on the worker, the callback server unreachable, KilledWorker) ends the run here.
        lost_worker = type(error).__name__ == "KilledWorker"
        message = f"Dask key {key} failed before its worker reported an outcome: {type(error).__name__}: {error}"
        self._lost(job, message, kind="WorkerLost" if lost_worker else "BackendError", cause=error)

    def _watch_workers(self) -> None:
        handlers = getattr(self.client, "_event_handlers", None)
        self._previous_handler = handlers.get(EVENT_TOPIC) if isinstance(handlers, dict) else None
        self.client.subscribe_topic(EVENT_TOPIC, self._on_scheduler_event)
        self._watching = True

    def _unwatch_workers(self) -> None:
        if not self._watching:
            return
        self._watching = False
        handlers = getattr(self.client, "_event_handlers", None)
        if isinstance(handlers, dict) and handlers.get(EVENT_TOPIC) != self._on_scheduler_event:
            return  # someone subscribed after us; theirs stays
        try:
            if self._previous_handler is not None:
                self.client.subscribe_topic(EVENT_TOPIC, self._previous_handler)
            else:
                self.client.unsubscribe_topic(EVENT_TOPIC)
        except Exception as exc:
            logger.debug("environment %r: could not unsubscribe from scheduler events: %r", self.name, exc)

    def _on_scheduler_event(self, event: Any) -> Any:
        """On the client's IO thread: spot removed workers that were processing our keys (and chain a prior handler)."""
        result = self._previous_handler(event) if self._previous_handler is not None else None
        message = event[1] if isinstance(event, (tuple, list)) and len(event) == 2 else None
        if isinstance(message, dict) and message.get("action") == "remove-worker":
            keys = [k for k in message.get("processing-tasks") or () if isinstance(k, str) and k.startswith(KEY_PREFIX)]
            if keys:
                self._call_soon(self._worker_removed, keys, str(message.get("worker")))
        return result

    def _worker_removed(self, keys: list[str], worker: str) -> None:
        for key in keys:
            job = self._jobs.pop(key, None)
            if job is None:
                continue
            message = f"Dask worker {worker} left the cluster while holding the run (key {key}); the key was released"
            logger.warning("environment %r: %s", self.name, message)
            self._lost(job, message, kind="WorkerLost")
            if job.future is not None:
                self._release_soon(job.future)

    def _lost(self, job: _Job, message: str, *, kind: str, cause: BaseException | None = None) -> None:
        exc = DeliveryLostError(f"environment {self.name!r}: {message}", environment=self.name, run_id=job.run_id)
        exc.__cause__ = cause
        ids = {"run_id": job.run_id, "task_id": job.task_id}
        self.report_lost(ids, message, kind=kind, retryable=kind == "WorkerLost", exception=exc)

    def _release_soon(self, future: Any) -> None:
        """Cancel a lost run's key, so Dask stops rescheduling it (a copy already started runs to its end)."""
        assert self._loop is not None
        task = self._loop.create_task(self._quietly("releasing a lost key", self.client.cancel, [future], force=True))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _call_soon(self, callback: Any, *args: Any) -> None:
        if self._loop is None or self._closed:
            return
        with contextlib.suppress(RuntimeError):  # the runtime loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(callback, *args)

    async def _quietly(self, what: str, func: Any, *args: Any, **kwargs: Any) -> None:
        try:
            await asyncio.wait_for(call_blocking(func, *args, **kwargs), SCHEDULER_TIMEOUT)
        except Exception as exc:
            logger.warning("environment %r: %s failed: %s: %s", self.name, what, type(exc).__name__, exc)


class _Completions:
    """Follows submitted futures on a daemon thread (``distributed.as_completed``) and passes each finished one on.

    ``Future.add_done_callback`` would do, but it runs callbacks on a thread pool that is already shut down when a
    script ends right after its weave (the last keys' completions are still on their way) and Dask then logs errors.
    """

    def __init__(self, client: Any, on_done: Any, *, name: str) -> None:
        distributed: Any = importlib.import_module("distributed")
        self._futures = distributed.as_completed(loop=client.loop, with_results=False)
        self._on_done = on_done
        self._more = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._follow, name=f"wove-dask-{name}", daemon=True)
        self._thread.start()

    def follow(self, futures: Sequence[Any]) -> None:
        self._futures.update(futures)
        self._more.set()

    def stop(self) -> None:
        self._stopped = True
        self._more.set()

    def _follow(self) -> None:
        while not self._stopped:
            try:
                future = next(self._futures)
            except StopIteration:  # nothing in flight: sleep until more is submitted
                self._more.wait(1.0)
                self._more.clear()
                continue
            if self._stopped:
                return
            try:
                self._on_done(future)
            except Exception:
                logger.exception("handling the end of Dask key %s failed", getattr(future, "key", "?"))


def run_payload(payload: Mapping[str, Any]) -> None:
    """What each Dask task runs: the payload through wove's worker entrypoint; returns ``None``.

    The value already went to the weave (Dask would keep a returned one in the worker's memory). Dask hands a key to
    one worker at a time, so a run that ends quickly posts only its terminal frame, carrying its start (see
    ``START_LAZY`` in :mod:`wove.backend.worker`): one request per short run instead of two.
    """
    from wove.backend import worker as backend_worker

    backend_worker.run_payload(payload, backend_worker.RunTrace(), start=backend_worker.START_LAZY)


def _check_client(environment: str, client: Any) -> None:
    if not all(callable(getattr(client, name, None)) for name in ("map", "cancel", "subscribe_topic")):
        raise ConfigError(f"environment {environment!r}: executor_config['client'] must be a distributed.Client")
    if getattr(client, "asynchronous", False):
        raise ConfigError(
            f"environment {environment!r}: executor_config['client'] must be a synchronous distributed.Client; an "
            "asynchronous one belongs to another event loop (pass its scheduler address as 'address' instead)"
        )


def _options(environment: str, config: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"environment {environment!r}: executor_config[{key!r}] must be a dict, got {value!r}")
    return dict(value)


def _submit_options(environment: str, config: Mapping[str, Any]) -> dict[str, Any]:
    options = _options(environment, config, "submit_options")
    unknown = sorted(set(options) - SUBMIT_OPTIONS)
    if unknown:
        allowed = ", ".join(sorted(SUBMIT_OPTIONS))
        raise ConfigError(
            f"environment {environment!r}: submit_options {unknown} are not supported (allowed: {allowed}); wove sets"
            " the key itself, and a task's retries re-run it as a new run"
        )
    return options
