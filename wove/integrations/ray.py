"""``RayAdapter``: runs payloads as Ray tasks. Workers need wove installed (a ``runtime_env`` may ship it), no more.

Each payload becomes one call of :func:`run_payload`, a ``ray.remote`` function that runs it through wove's worker
entrypoint, named ``wove:<task name>`` in Ray's task listings. When Ray is not initialized in
this process yet, ``start`` initializes it (``address``, ``init_options``) on a thread that stays alive until
``close`` shuts it down: Ray ties the local processes it starts to the thread that started them. A Ray that was
already initialized is used as is and never shut down.

``.remote()`` costs a few hundred microseconds (the first call exports the function: over 100 ms), so submissions go
through a worker thread, in batches. A run's outcome comes from its worker; five times a second the references of
runs still pending are checked (``ray.wait``, nothing fetched), so a worker that dies (``ray.cancel`` from elsewhere,
the OOM killer, a lost node) ends its run without waiting for heartbeats. ``max_retries``
defaults to 0 so Ray does not run a started run a second time; a task's ``retries`` re-run it as a new run.
Cancelling uses ``ray.cancel(ref, force=True)``: a queued task never starts, a running one has its worker process
killed (Ray starts another).

Config keys (``executor_config``): ``address`` (``None`` starts or finds a local Ray; ``"auto"``, ``"ray://..."``),
``init_options`` (keyword arguments for ``ray.init``, used only when this adapter initializes Ray),
``remote_options`` (passed to ``.options()``: ``num_cpus``, ``num_gpus``, ``resources``, ``memory``,
``runtime_env``, ``scheduling_strategy``, ``max_retries``, ...).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from wove._types import Frame
from wove.errors import BackendUnavailableError, CallbackError, ConfigError, DeliveryLostError
from wove.integrations._batching import BatchSubmitter, call_blocking
from wove.integrations.base import BackendAdapter

__all__ = ["RayAdapter", "RaySubmission", "run_payload"]

logger = logging.getLogger("wove.integrations.ray")

#: ``remote_options`` wove sets for every task unless the configuration says otherwise.
DEFAULT_REMOTE_OPTIONS: Mapping[str, Any] = {"max_retries": 0}
#: ``remote_options`` that would break the one-run-one-outcome contract.
FORBIDDEN_REMOTE_OPTIONS = {
    "num_returns": "each run returns exactly one (empty) object",
    "retry_exceptions": "a task's retries re-run it as a new run",
}
#: Seconds ``close`` gives ``ray.shutdown`` (it takes about 1.5 s for a local Ray).
SHUTDOWN_TIMEOUT = 30.0
#: Remote functions with their options kept per task name (``.options()`` is not cheap); cleared past this many.
NAMED_REMOTES = 256
#: Seconds between two looks at the pending runs' references for a task that ended without reporting its run.
SWEEP_INTERVAL = 0.2
#: ``ray.exceptions`` names meaning the process running the task (or its node) is gone.
LOST_WORKER_ERRORS = (
    "WorkerCrashedError",
    "NodeDiedError",
    "LocalRayletDiedError",
    "OutOfMemoryError",
    "ObjectLostError",
)


def run_payload(payload: Mapping[str, Any]) -> None:
    """What each Ray task runs: the payload through wove's worker entrypoint.

    Ray hands a task to one worker at a time (``max_retries`` reruns it only after its worker died), so a run that
    ends quickly posts only its terminal frame, carrying its start (``START_LAZY`` in :mod:`wove.backend.worker`).
    SIGTERM stays Ray's: Ray ends its own workers, the adapter learns of it from the task's reference, and the
    task runs in the worker's main thread without a hand-off.

    Returns ``None``: the value already went to the weave, and Ray would store a returned one in its object store.
    The task's own exception is re-raised after the weave got it, so Ray records the task as failed. A copy of a run
    that is no longer pending (a Ray retry after the run resolved or was cancelled) ends without running anything.
    """
    from wove.backend import worker as backend_worker

    try:
        backend_worker.run_payload(payload, backend_worker.RunTrace(), start=backend_worker.START_LAZY, sigterm=False)
    except CallbackError as exc:
        if not exc.duplicate_delivery:
            raise
        logger.info("run %s is no longer pending; skipped this execution", payload.get("run_id"))


@dataclass(frozen=True)
class RaySubmission:
    """The Ray task id of one run (as ``ray list tasks`` shows it); the weave's records show it as ``submission``."""

    task_id: str

    def __str__(self) -> str:
        return self.task_id


@dataclass(eq=False)
class _Job:
    run_id: str
    task_id: Any
    ref: Any = None  # the ObjectRef of the task's (empty) result


class RayAdapter(BackendAdapter):
    """Submits payloads as Ray tasks of :func:`run_payload`."""

    backend: ClassVar[str] = "ray"
    required_modules: ClassVar[tuple[str, ...]] = ("ray",)
    install_hint: ClassVar[str] = "pip install 'wove[ray]'"
    #: Ray sends task arguments up to 100 KiB inside the task spec; larger ones would go through its object store.
    #: Bodies above that are fetched by the worker from the callback server instead.
    inline_payload_limit: ClassVar[int | None] = 100 * 1024

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        address = self.config.get("address")
        self.address: str | None = str(address) if address else None
        self.init_options = _options(self.name, self.config, "init_options")
        if self.address is not None and "address" in self.init_options:
            raise ConfigError(f"environment {self.name!r}: give the Ray address once, as 'address'")
        self.remote_options = {**DEFAULT_REMOTE_OPTIONS, **_options(self.name, self.config, "remote_options")}
        for key, why in FORBIDDEN_REMOTE_OPTIONS.items():
            if key in self.remote_options:
                raise ConfigError(f"environment {self.name!r}: remote_options may not set {key!r} ({why})")
        self.ray: Any = None
        self._remote: Any = None
        self._owner: _RayOwner | None = None
        self._jobs: dict[str, _Job] = {}
        self._submitter: BatchSubmitter[tuple[Frame, str], tuple[Any, str]] = BatchSubmitter(self._submit_many)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._watching = asyncio.Event()  # set while runs are pending: an idle environment's sweeper sleeps
        self._asking: asyncio.Future[list[tuple[Any, BaseException | None]]] | None = None  # a sweep's Ray call
        self._closed = False

    @property
    def owns_ray(self) -> bool:
        """Whether this adapter initialized Ray (and so shuts it down in ``close``)."""
        return self._owner is not None

    # -- adapter contract ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Import Ray, initialize it unless this process already did, and check ``remote_options``."""
        self._loop = asyncio.get_running_loop()
        self.ray = await self.run_blocking(_import_ray)
        if not self.ray.is_initialized():
            self._owner = _RayOwner(self.ray)
            options = {"address": self.address, **self.init_options}
            try:
                await self._owner.start(options)
            except Exception as exc:
                message = f"could not initialize Ray (address={self.address!r}): {type(exc).__name__}: {exc}"
                raise BackendUnavailableError(f"environment {self.name!r}: {message}", environment=self.name) from exc
        elif self.address is not None or self.init_options:
            logger.info("environment %r: Ray is already initialized; address and init_options are unused", self.name)
        self._remote = self.ray.remote(run_payload)
        self._named: dict[str, Any] = {}  # task name -> the remote function with its options
        try:
            self._remote.options(**self.remote_options)  # validates them now rather than at the first submission
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"environment {self.name!r}: invalid remote_options: {exc}") from exc
        self._sweeper = self._loop.create_task(self._sweep())

    async def submit(self, payload: Frame, frame: Frame) -> RaySubmission:
        """Start the task (from a worker thread); returns once Ray holds it."""
        run_id = str(frame["run_id"])
        job = _Job(run_id, frame.get("task_id"))
        self._jobs[run_id] = job
        self._watching.set()
        name = f"wove:{frame.get('task_name') or 'task'}"
        try:
            with self.translate_errors("submit", run_id=run_id):
                job.ref, task_id = await self._submitter.submit((payload, name))
        except BaseException:
            self._jobs.pop(run_id, None)
            raise
        return RaySubmission(task_id)

    async def cancel(self, run_id: str, submission: Any, frame: Frame) -> None:
        """``ray.cancel(ref, force=True)``: drops a queued task, kills the worker process of a running one."""
        job = self._jobs.pop(run_id, None)
        if job is None or job.ref is None:
            return  # finished, lost, or never submitted
        with self.translate_errors("cancel", run_id=run_id):
            await self.run_blocking(self.ray.cancel, job.ref, force=True)

    async def close(self) -> None:
        """Shut Ray down if this adapter started it.

        Runs still pending were already handled by the runtime's orphan policy (``cancel`` sends each a
        ``cancel_task``). Force-cancelling every reference here raced tasks that had posted their outcome and
        were returning, which aborts Ray's core worker ("Tried to complete task that was not pending")."""
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._asking is not None:  # a sweep's call into Ray finishes before Ray may shut down
            await asyncio.gather(self._asking, return_exceptions=True)
        self._jobs.clear()
        if self._owner is not None:
            await self._owner.stop()

    def run_ended(self, run_id: str) -> None:
        """The worker reported the run's outcome: stop watching its reference (Ray may then free the empty result)."""
        self._jobs.pop(run_id, None)

    # -- submission and completion ---------------------------------------------------------------------------

    def _submit_many(self, items: Sequence[tuple[Frame, str]]) -> list[tuple[Any, str] | BaseException]:
        """In a worker thread: start each task."""
        outcomes: list[tuple[Any, str] | BaseException] = []
        for payload, name in items:
            try:
                remote = self._named.get(name)
                if remote is None:  # .options() builds a new remote function: once per task name, not per run
                    if len(self._named) >= NAMED_REMOTES:
                        self._named.clear()
                    remote = self._named[name] = self._remote.options(**{"name": name, **self.remote_options})
                ref = remote.remote(payload)
                outcomes.append((ref, ref.task_id().hex()))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    async def _sweep(self) -> None:
        """Every ``SWEEP_INTERVAL``: end the runs whose task is done although no outcome came from its worker.

        ``run_ended`` drops a run as soon as its outcome arrives, which is before Ray marks its task done, so a done
        reference still here belongs to a task that ended some other way (its worker died, wove missing there, the
        callback server unreachable). One ``ray.wait`` over the pending references a few times a second costs the
        driver far less than an asynchronous fetch of every task's empty result.
        """
        while True:
            if not self._jobs:
                self._watching.clear()
                await self._watching.wait()
            await asyncio.sleep(SWEEP_INTERVAL)
            pending = {job.ref: run_id for run_id, job in self._jobs.items() if job.ref is not None}
            if not pending:
                continue
            self._asking = asyncio.ensure_future(call_blocking(self._ended, list(pending)))
            try:
                ended = await asyncio.shield(self._asking)
            except Exception as exc:  # Ray going away under a Ray this adapter does not own: look again later
                logger.warning("environment %r: could not ask Ray which tasks ended: %s", self.name, _describe(exc))
                continue
            for ref, error in ended:
                self._finished(pending[ref], error)

    def _ended(self, refs: list[Any]) -> list[tuple[Any, BaseException | None]]:
        """In a worker thread: the references whose task is done, each with the error it ended with (or ``None``)."""
        done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        ended: list[tuple[Any, BaseException | None]] = []
        for ref in done:
            try:
                self.ray.get(ref, timeout=SWEEP_INTERVAL)
                ended.append((ref, None))
            except self.ray.exceptions.GetTimeoutError:
                continue  # done but not readable yet: the next sweep looks again
            except Exception as exc:  # the task's error, or Ray's word that its worker or node is gone
                ended.append((ref, exc))
        return ended

    def _finished(self, run_id: str, error: BaseException | None) -> None:
        job = self._jobs.pop(run_id, None)
        if job is None or error is None:
            return  # cancelled by wove, or ended normally (the worker reported its outcome)
        if isinstance(error, self.ray.exceptions.TaskCancelledError):
            logger.warning("environment %r: Ray task of run %s was cancelled outside wove", self.name, run_id)
            self.emit({"type": "task_cancelled", "run_id": job.run_id, "task_id": job.task_id})
            return
        lost = any(isinstance(error, getattr(self.ray.exceptions, name, ())) for name in LOST_WORKER_ERRORS)
        if lost:
            message = f"the Ray worker running the task died: {_describe(error)}"
        else:  # the task's own exception was posted before it propagated, so this report is dropped as late
            message = f"the Ray task failed before its worker reported an outcome: {_describe(error)}"
        exc = DeliveryLostError(f"environment {self.name!r}: {message}", environment=self.name, run_id=run_id)
        exc.__cause__ = error
        ids = {"run_id": job.run_id, "task_id": job.task_id}
        self.report_lost(ids, message, kind="WorkerLost" if lost else "BackendError", retryable=lost, exception=exc)


class _RayOwner:
    """The thread that runs ``ray.init`` and, at the end, ``ray.shutdown``.

    Ray starts its local processes with ``PR_SET_PDEATHSIG``, which fires when the *thread* that started them ends;
    a pool thread (``run_blocking``) may end at any time, so this one lives exactly as long as Ray.
    """

    def __init__(self, ray: Any) -> None:
        self.ray = ray
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    async def start(self, options: Mapping[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def settle(error: BaseException | None) -> None:
            if ready.done():
                return
            if error is None:
                ready.set_result(None)
            else:
                ready.set_exception(error)

        def hold() -> None:
            try:
                self.ray.init(**options)
            except BaseException as exc:
                loop.call_soon_threadsafe(settle, exc)
                return
            loop.call_soon_threadsafe(settle, None)
            self._stop.wait()
            try:
                self.ray.shutdown()
            except Exception:
                logger.exception("ray.shutdown() failed")

        self._thread = threading.Thread(target=hold, name="wove-ray", daemon=True)
        self._thread.start()
        await ready

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await call_blocking(self._thread.join, SHUTDOWN_TIMEOUT)


def _import_ray() -> Any:
    return importlib.import_module("ray")  # about 0.5 s: never at wove's import, and never on the runtime loop


def _describe(error: BaseException) -> str:
    """``Type: first line``; for a task that raised (``RayTaskError``), of the exception it raised."""
    cause = getattr(error, "cause", None)
    shown = cause if isinstance(cause, BaseException) else error
    lines = str(shown).strip().splitlines()
    return f"{type(shown).__name__}: {lines[0] if lines else ''}"


def _options(environment: str, config: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"environment {environment!r}: executor_config[{key!r}] must be a dict, got {value!r}")
    return dict(value)
