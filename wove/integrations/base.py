"""The backend adapter contract: how a dispatch payload reaches a task system, and how it is cancelled.

An adapter never runs task code and never builds payloads. ``BackendAdapterEnvironmentExecutor``
(``wove.environment.remote``) builds each payload, points it at the callback server, and hands it to
``submit``; the backend's worker runs it through ``wove.integrations.worker`` and posts events back.
So a custom adapter only fills ``submit`` and ``cancel`` (plus ``start``/``close`` when it holds a client)::

    class QueueAdapter(BackendAdapter):
        backend = "myqueue"
        required_modules = ("myqueue",)
        install_hint = "pip install myqueue"

        async def submit(self, payload: Frame, frame: Frame) -> Any:
            with self.translate_errors("submit", run_id=frame["run_id"]):
                return await self.run_blocking(self.client.enqueue, "wove_worker", payload)

        async def cancel(self, run_id: str, submission: Any, frame: Frame) -> None:
            await self.run_blocking(self.client.revoke, submission)
"""

from __future__ import annotations

import abc
import contextlib
import importlib.util
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, ParamSpec, TypeVar

from wove._types import Frame
from wove.errors import BackendUnavailableError, DeliveryLostError, SubmitError, WoveError

__all__ = ["DISPATCH_HINT", "DISPATCH_MODULES", "BackendAdapter", "EventSink", "check_modules"]

logger = logging.getLogger("wove.integrations")

P = ParamSpec("P")
T = TypeVar("T")

#: Receives event frames an adapter produces itself (a worker it owns died, a job it knows was lost).
EventSink = Callable[[Frame], None]


#: What the ``dispatch`` extra installs: the callback server (aiohttp), pickling tasks by value (cloudpickle) and
#: the workers' HTTP client (httptools). Needed wherever payloads are built, served or run.
DISPATCH_MODULES = ("aiohttp", "cloudpickle", "httptools")
DISPATCH_HINT = "pip install 'wove[dispatch]'"


def check_modules(modules: tuple[str, ...], install_hint: str, *, what: str) -> None:
    """Raise ``BackendUnavailableError`` naming ``install_hint`` unless every module in ``modules`` is importable.

    Uses ``importlib.util.find_spec`` so nothing is imported (an SDK import can take seconds).
    """
    missing = [name for name in modules if not _importable(name)]
    if missing:
        listed = ", ".join(missing)
        raise BackendUnavailableError(f"{what} needs {listed}, which is not installed; run: {install_hint}")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or a broken __spec__
        return False


class BackendAdapter(abc.ABC):
    """Submits dispatch payloads to one backend and cancels them; one instance per started environment.

    Construct with keyword arguments only (the executor does this):

    - ``name``: the environment name, for messages and logs.
    - ``config``: the environment's ``executor_config`` (read your own keys; ignore unknown ones).
    - ``callback_url``: the callback server's public base URL, for adapters that must tell workers where wove
      is (a health check, a network policy). It carries no credential; each payload has its own run URL.
    - ``run_config``: the run-level settings the runtime passes to ``EnvironmentExecutor.start``.
    - ``on_event``: where ``emit`` delivers frames; set by the executor.
    """

    #: Registry name, copied into each payload's ``adapter`` field.
    backend: ClassVar[str] = "custom"
    #: Top-level modules the backend's SDK needs in the submitting process.
    required_modules: ClassVar[tuple[str, ...]] = ()
    #: The command that installs ``required_modules``; quoted in ``BackendUnavailableError``.
    install_hint: ClassVar[str] = "pip install 'wove[dispatch]'"
    #: When the pickled callable and arguments exceed this many bytes (as base64), the largest of them are stored on
    #: the callback server and the worker fetches them (by reference), keeping broker messages small. None means
    #: always inline. ``executor_config["inline_payload_limit"]`` overrides it per environment.
    inline_payload_limit: ClassVar[int | None] = 32 * 1024
    #: True when every worker is a process of this user on this machine (the ``process`` pool): the executor then
    #: also serves callbacks on a private Unix socket, named in each payload as ``callback_socket`` (workers fall
    #: back to the callback URL when they cannot reach it), which skips the kernel's loopback TCP stack.
    local_workers: ClassVar[bool] = False

    def __init__(
        self,
        *,
        name: str,
        config: Mapping[str, Any],
        callback_url: str,
        run_config: Mapping[str, Any],
        on_event: EventSink | None = None,
    ) -> None:
        self.name = name
        self.config = dict(config)
        self.callback_url = callback_url
        self.run_config = dict(run_config)
        self._on_event = on_event

    def __repr__(self) -> str:
        return f"<{type(self).__name__} environment={self.name!r} backend={self.backend!r}>"

    @classmethod
    def check_available(cls) -> None:
        """Raise ``BackendUnavailableError`` naming ``install_hint`` when a required module is missing."""
        check_modules(cls.required_modules, cls.install_hint, what=f"the {cls.backend!r} backend")

    async def start(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Connect to the backend (clients, pools). Called once, after the callback server is up."""

    @abc.abstractmethod
    async def submit(self, payload: Frame, frame: Frame) -> Any:
        """Hand ``payload`` to the backend and return an object identifying the job (passed back to ``cancel``).

        ``frame`` is the ``run_task`` frame the payload came from (``run_id``, ``task_name``, ``delivery``).
        Return as soon as the backend accepted the job; never wait for it to run. Raise ``SubmitError``
        (or any exception; the executor wraps it) when the backend refuses it.
        """

    def submit_nowait(self, payload: Frame, frame: Frame) -> Any:
        """Optional fast path for a backend whose submission never waits (a local queue, a pipe).

        Return the submission as ``submit`` would, synchronously and without blocking; the default returns
        ``NotImplemented``, and the executor then awaits ``submit`` in a task of its own.
        """
        return NotImplemented

    @abc.abstractmethod
    async def cancel(self, run_id: str, submission: Any, frame: Frame) -> None:
        """Best-effort stop of one job: revoke it if queued, terminate it if the backend can.

        The executor reports ``task_cancelled`` to the runtime once this returns, so a job that cannot be
        stopped simply has its late frames ignored.
        """

    async def close(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release clients and pools. Must be safe to call twice."""

    def run_ended(self, run_id: str) -> None:  # noqa: B027 - optional hook, no-op by default
        """Called (in the event loop) once a run's terminal frame reached the executor, whoever sent it.

        An adapter that watches jobs can stop watching this one; a pool can hand its worker the next payload.
        It must not block.
        """

    def run_abandoned(self, run_id: str) -> None:
        """Called (in the event loop) when the weave stopped waiting for a run without cancelling it: its worker
        went silent past ``delivery_heartbeat_seconds`` under the ``fail`` or ``requeue`` orphan policy.

        The run's callback URL is closed already, so its late frames are refused. By default this is
        :meth:`run_ended` (stop watching the job); an adapter that owns its workers may reclaim the one it used.
        It must not block.
        """
        self.run_ended(run_id)

    # -- helpers for subclasses ------------------------------------------------------------------------------

    def emit(self, frame: Frame) -> None:
        """Report an event the backend's worker cannot (the adapter saw the job die or vanish)."""
        if self._on_event is None:
            logger.warning("%r has no event sink; dropped %s for run %s", self, frame.get("type"), frame.get("run_id"))
            return
        self._on_event(frame)

    def report_lost(
        self,
        frame: Frame,
        message: str,
        *,
        kind: str = "WorkerLost",
        retryable: bool = True,
        exception: BaseException | None = None,
    ) -> None:
        """Emit a ``task_error`` for a run whose worker died before reporting an outcome.

        ``exception`` defaults to ``DeliveryLostError``, which is what the weave raises for the task.
        """
        run_id = str(frame["run_id"])
        if exception is None:
            exception = DeliveryLostError(f"environment {self.name!r}: {message}", environment=self.name, run_id=run_id)
        self.emit(
            {
                "type": "task_error",
                "run_id": run_id,
                "task_id": frame.get("task_id"),
                "finished_at": time.time(),
                "exception": exception,
                "error": {
                    "kind": kind,
                    "message": message,
                    "traceback": "",
                    "retryable": retryable,
                    "source": "backend",
                },
            }
        )

    @contextlib.contextmanager
    def translate_errors(self, action: str, *, run_id: str | None = None) -> Iterator[None]:
        """Turn any non-wove exception raised inside into ``SubmitError`` (``from`` the original)."""
        try:
            yield
        except WoveError:
            raise
        except Exception as exc:
            message = f"environment {self.name!r} ({self.backend}): {action} failed: {type(exc).__name__}: {exc}"
            raise SubmitError(message, environment=self.name, run_id=run_id) from exc

    async def run_blocking(self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking SDK call in a worker thread so the weave's event loop keeps moving.

        At interpreter exit, when thread pools take no more work, the call runs inline instead, so an adapter's
        ``close`` still works when ``wove.shutdown`` runs from ``atexit``."""
        from wove.integrations._batching import call_blocking

        return await call_blocking(func, *args, **kwargs)
