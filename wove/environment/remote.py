"""``BackendAdapterEnvironmentExecutor``: turns any ``BackendAdapter`` into an ``EnvironmentExecutor``.

It owns the callback server. For each ``run_task`` it opens a run on the server (a run-scoped callback URL),
builds the dispatch payload, and hands it to the adapter in the background, so ``send`` never waits on a
broker. Worker callbacks come back through the server; frames the adapter or this executor produce (a
refused submission, a dead worker, a confirmed cancel) join the same stream. Every frame is stamped with
``submitted_at``/``started_at``/``finished_at`` and the worker's ``host``/``pid`` where known.

``executor_config`` keys read here: ``callback_host``, ``callback_port`` (where wove listens), ``callback_url``
(what workers call, e.g. behind a proxy), ``callback_token``, ``callback_ssl_certfile``/``callback_ssl_keyfile``
(serve HTTPS), ``callback_socket`` (also serve a private Unix socket for workers on this host) and
``inline_payload_limit`` (bytes; larger payloads are fetched by reference). The rest belongs to the adapter.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from wove._types import TERMINAL_EVENTS, Frame
from wove.environment.base import EnvironmentExecutor
from wove.errors import BackendUnavailableError, ConfigError, PayloadError, SubmitError, WoveError
from wove.integrations import get_adapter_class
from wove.integrations.base import DISPATCH_HINT, DISPATCH_MODULES, BackendAdapter, check_modules

if TYPE_CHECKING:
    from wove.backend import BackendCallbackServer

__all__ = ["BackendAdapterEnvironmentExecutor"]

logger = logging.getLogger("wove.environment.remote")

#: Seconds an adapter-reported failure (a dead worker) waits, so an outcome the worker posted just before
#: dying reaches the runtime first and wins.
LOST_GRACE = 0.05


@dataclass(eq=False)
class _Run:
    run_id: str
    task_id: Any
    submitted_at: float
    submission: Any = None
    submitting: asyncio.Task[None] | None = field(default=None, repr=False)
    started_at: float | None = None
    host: str | None = None
    pid: int | None = None


class BackendAdapterEnvironmentExecutor(EnvironmentExecutor):
    """Runs an environment's tasks on a backend through its adapter and the callback server.

    ``name`` is the environment name. ``adapter_class`` fixes the adapter; without it the class registered under
    ``environment_config["executor"]`` (see ``wove.integrations``) is used.
    """

    def __init__(self, name: str, adapter_class: type[BackendAdapter] | None = None) -> None:
        self.name = name
        self.adapter_class = adapter_class
        self.adapter: BackendAdapter | None = None
        self.server: BackendCallbackServer | None = None
        self.inline_payload_limit: int | None = None
        #: The server's Unix socket for adapters whose workers share this host (``BackendAdapter.local_workers``).
        self.callback_socket: str | None = None
        self._events: asyncio.Queue[Frame | BaseException] = asyncio.Queue()
        self._sink: Callable[[Frame], None] = self._events.put_nowait
        self._runs: dict[str, _Run] = {}
        self._pump: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._stopped = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} environment={self.name!r} adapter={self.adapter!r}>"

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(
        self,
        *,
        environment_name: str,
        environment_config: Mapping[str, Any],
        run_config: Mapping[str, Any],
    ) -> None:
        if self._started:
            return
        self._started = True
        self.name = environment_name or self.name
        self._loop = asyncio.get_running_loop()
        adapter_class = self.adapter_class or get_adapter_class(str(environment_config.get("executor")))
        check_modules(DISPATCH_MODULES, DISPATCH_HINT, what=f"environment {self.name!r} (dispatch to a backend)")
        try:
            adapter_class.check_available()
        except BackendUnavailableError as exc:
            raise BackendUnavailableError(f"environment {self.name!r}: {exc}", environment=self.name) from None
        config = dict(environment_config.get("executor_config") or {})
        if config.get("max_workers") is None and environment_config.get("max_workers") is not None:
            config["max_workers"] = environment_config["max_workers"]
        limit = config.get("inline_payload_limit", adapter_class.inline_payload_limit)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ConfigError(f"environment {self.name!r}: inline_payload_limit must be bytes >= 0 or None")
        self.inline_payload_limit = limit
        offer_socket = _offers_socket(self.name, config, adapter_class)

        from wove.backend import BackendCallbackServer

        self.server = BackendCallbackServer(**_server_options(config))
        self.server.deliver_to(self._accept_quietly)
        await self.server.start()
        assert self.server.public_url is not None  # set by start()
        if offer_socket:
            self.callback_socket = await self._listen_locally(self.server)
        self._pump = self._loop.create_task(self._pump_frames())
        try:
            self.adapter = adapter_class(
                name=self.name,
                config=config,
                callback_url=self.server.public_url,
                run_config=run_config,
                on_event=self._on_adapter_event,
            )
            await self.adapter.start()
        except BaseException:  # a bad adapter option, an unreachable backend: leave nothing listening
            await self.stop()
            raise
        logger.debug("environment %r: %r started, callbacks at %s", self.name, self.adapter, self.server.public_url)

    async def _listen_locally(self, server: BackendCallbackServer) -> str | None:
        try:
            return await server.listen_unix()
        except BackendUnavailableError as exc:
            logger.debug("environment %r: workers call back over TCP: %s", self.name, exc)
            return None

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        submitting = [run.submitting for run in self._runs.values() if run.submitting is not None]
        for task in submitting:
            task.cancel()
        await asyncio.gather(*submitting, return_exceptions=True)
        if self.adapter is not None:
            try:
                await self.adapter.close()
            except Exception:
                logger.exception("environment %r: adapter close failed", self.name)
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        if self.server is not None:
            try:
                await self.server.stop()
            except Exception:
                logger.exception("environment %r: callback server stop failed", self.name)

    # -- commands --------------------------------------------------------------------------------------------

    async def send(self, frame: Frame) -> None:
        kind = frame.get("type")
        if kind == "run_task":
            self.send_nowait(frame)
        elif kind == "cancel_task":
            await self._cancel_task(frame)
        elif kind == "shutdown":
            logger.debug("environment %r: shutdown requested; resources are released by stop()", self.name)
        else:
            raise ConfigError(f"environment {self.name!r}: unknown command frame type {kind!r}")

    def send_nowait(self, frame: Frame) -> None:
        """Take a ``run_task`` frame: build its payload and hand it to the adapter (``submit_nowait`` when it offers
        it, else ``submit`` in a task). A submission that fails ends the run with a ``task_error``."""
        if self.adapter is None or self.server is None or self._stopped:
            raise SubmitError(f"environment {self.name!r} is not running", environment=self.name)
        run_id = str(frame["run_id"])
        run = _Run(run_id, frame.get("task_id"), time.time())
        self._runs[run_id] = run
        try:
            payload = self._build_payload(frame)
        except Exception as exc:
            self._submit_failed(run, exc)
            return
        try:
            with self.adapter.translate_errors("submit", run_id=run_id):
                submission = self.adapter.submit_nowait(payload, frame)
        except Exception as exc:
            self._submit_failed(run, exc)
            return
        if submission is not NotImplemented:
            run.submission = submission
            return
        assert self._loop is not None
        run.submitting = self._loop.create_task(self._submit(run, payload, frame))

    def _build_payload(self, frame: Frame) -> Frame:
        """Open the run on the server (its own callback URL) and pickle the task, by reference above the limit."""
        from wove.backend.codec import build_backend_payload_for_run

        assert self.adapter is not None and self.server is not None
        limit = sys.maxsize if self.inline_payload_limit is None else self.inline_payload_limit
        payload = build_backend_payload_for_run(
            frame, server=self.server, adapter=self.adapter.backend, inline_limit=limit
        )
        if self.callback_socket is not None:
            payload["callback_socket"] = self.callback_socket
        return payload

    async def _submit(self, run: _Run, payload: Frame, frame: Frame) -> None:
        assert self.adapter is not None
        try:
            with self.adapter.translate_errors("submit", run_id=run.run_id):
                run.submission = await self.adapter.submit(payload, frame)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._submit_failed(run, exc)
        finally:
            run.submitting = None

    def _submit_failed(self, run: _Run, exc: Exception) -> None:
        if not isinstance(exc, WoveError):
            message = f"environment {self.name!r}: could not build the payload: {type(exc).__name__}: {exc}"
            wrapped = SubmitError(message, environment=self.name, run_id=run.run_id)
            wrapped.__cause__ = exc
            exc = wrapped
        logger.warning("environment %r: submission of run %s failed: %s", self.name, run.run_id, exc)
        error = {
            "kind": type(exc).__name__,
            "message": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            "retryable": not isinstance(exc, (PayloadError, ConfigError)),  # a broker outage may pass
            "source": "submit",
        }
        self._finish(
            run, {"type": "task_error", "run_id": run.run_id, "task_id": run.task_id, "exception": exc, "error": error}
        )

    async def _cancel_task(self, frame: Frame) -> None:
        run = self._runs.get(str(frame.get("run_id")))
        if run is None or self.adapter is None:
            return  # already finished, or never ours
        if run.submitting is not None:
            await asyncio.gather(asyncio.shield(run.submitting), return_exceptions=True)
            if run.run_id not in self._runs:
                return  # the submission failed and already ended the run
        if self.server is not None:
            # First, so a worker that picks the run up while the backend is still being told is refused its
            # task_started (and, on backends whose workers wait for that answer, never runs the task).
            self.server.close_run(run.run_id)
        try:
            await self.adapter.cancel(run.run_id, run.submission, frame)
        except Exception:
            logger.exception("environment %r: cancelling run %s failed; it may still run", self.name, run.run_id)
            return
        if run.run_id in self._runs:
            self._finish(run, {"type": "task_cancelled", "run_id": run.run_id, "task_id": run.task_id})

    def forget(self, run_id: str) -> None:
        """The weave gave up on a run without cancelling it: close its callback URL and stop the adapter watching."""
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        if self.server is not None:
            self.server.close_run(run_id)
        if self.adapter is not None:
            try:
                self.adapter.run_abandoned(run_id)
            except Exception:
                logger.exception("environment %r: the adapter's run_abandoned failed", self.name)

    # -- events ----------------------------------------------------------------------------------------------

    def deliver_to(self, sink: Callable[[Frame], None]) -> None:
        self._sink = sink

    async def recv(self) -> Frame:
        """The next event frame; raises once the callback server failed, so the runtime retires the environment."""
        item = await self._events.get()
        if isinstance(item, BaseException):
            self._events.put_nowait(item)  # every later recv fails the same way
            raise item
        return item

    async def _pump_frames(self) -> None:
        """Move callback frames from the server into the event stream, stamping each on the way."""
        assert self.server is not None
        try:
            while True:
                self._accept_quietly(await self.server.recv())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._stopped:
                logger.error("environment %r: callback server failed: %r", self.name, exc)
                message = f"environment {self.name!r}: callback server failed: {type(exc).__name__}: {exc}"
                failure = BackendUnavailableError(message, environment=self.name)
                failure.__cause__ = exc
                self._events.put_nowait(failure)

    def _accept_quietly(self, frame: Frame) -> None:
        """Where the callback server delivers each frame (directly, or through ``recv`` in the pump)."""
        try:
            self._accept(frame)
        except Exception:
            logger.exception("environment %r: could not annotate a %s frame", self.name, frame.get("type"))
            self._sink(frame)

    def _on_adapter_event(self, frame: Frame) -> None:
        """Event sink handed to the adapter; callable from any thread."""
        assert self._loop is not None
        delay = LOST_GRACE if frame.get("type") in TERMINAL_EVENTS else 0.0
        try:
            self._loop.call_soon_threadsafe(self._loop.call_later, delay, self._accept_own, frame)
        except RuntimeError:  # the loop is closed: the environment is gone and so is whoever waited
            logger.debug("environment %r: dropped a %s frame after shutdown", self.name, frame.get("type"))

    def _accept_own(self, frame: Frame) -> None:
        run = self._runs.get(str(frame.get("run_id")))
        if run is None:
            logger.debug(
                "environment %r: dropped %s for finished run %s", self.name, frame.get("type"), frame.get("run_id")
            )
            return
        self._finish(run, frame) if frame.get("type") in TERMINAL_EVENTS else self._accept(frame)

    def _finish(self, run: _Run, frame: Frame) -> None:
        """Deliver a terminal frame wove produced itself and tell the server the run is over."""
        if self.server is not None:
            self.server.close_run(run.run_id)
        self._accept(frame)

    def _accept(self, frame: Frame) -> None:
        """Stamp timing and placement onto ``frame`` and queue it for ``recv``."""
        run = self._runs.get(str(frame.get("run_id")))
        if run is not None:
            now = time.time()
            kind = frame.get("type")
            submitting = run.submitting
            if (
                kind in TERMINAL_EVENTS
                and submitting is not None
                and not submitting.done()
                and submitting is not asyncio.current_task()
            ):
                # The worker finished before submit() returned (a short task, a slow broker acknowledgement): hold
                # the outcome until the backend's id for the job is known, so the run's record carries it.
                submitting.add_done_callback(lambda _: self._accept(frame))
                return
            frame.setdefault("submitted_at", run.submitted_at)
            if kind == "task_started":
                run.started_at = _number(frame.get("started_at", frame.get("at")), now)
                run.host = frame.get("host") if isinstance(frame.get("host"), str) else run.host
                run.pid = frame.get("pid") if isinstance(frame.get("pid"), int) else run.pid
            elif kind in TERMINAL_EVENTS:
                del self._runs[run.run_id]
                frame.setdefault("finished_at", _number(frame.get("at"), now))
                if self.adapter is not None:
                    try:
                        self.adapter.run_ended(run.run_id)
                    except Exception:
                        logger.exception("environment %r: the adapter's run_ended failed", self.name)
            if run.submission is not None:  # a worker may start before submit() returned: stamp every frame
                frame.setdefault("submission", str(run.submission))
            if run.started_at is not None:
                frame.setdefault("started_at", run.started_at)
            if run.host is not None:
                frame.setdefault("host", run.host)
            if run.pid is not None:
                frame.setdefault("pid", run.pid)
        self._sink(frame)


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _offers_socket(environment: str, config: Mapping[str, Any], adapter_class: type[BackendAdapter]) -> bool:
    """Whether workers get the server's Unix socket: ``callback_socket`` when set, else when the adapter's workers
    share this host and no ``callback_url`` says where workers must call."""
    choice = config.get("callback_socket")
    if choice is None:
        return adapter_class.local_workers and not config.get("callback_url")
    if not isinstance(choice, bool):
        raise ConfigError(f"environment {environment!r}: callback_socket must be true or false, not {choice!r}")
    return choice


def _server_options(config: Mapping[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {
        "host": config.get("callback_host", "127.0.0.1"),
        "port": int(config.get("callback_port", 0)),
        "public_url": config.get("callback_url"),
        "token": config.get("callback_token"),
    }
    certfile, keyfile = config.get("callback_ssl_certfile"), config.get("callback_ssl_keyfile")
    if certfile or keyfile:
        options["ssl_certfile"], options["ssl_keyfile"] = certfile, keyfile
    return options
