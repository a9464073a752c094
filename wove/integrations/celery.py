"""``CeleryAdapter``: runs selected tasks on an existing Celery cluster.

Each payload becomes one call of the task wove ships (``wove.run_payload``, see
:mod:`wove.integrations.celery_worker`), sent by name with ``send_task`` to the ``queue`` (default ``"wove"``), with
the run id as the Celery task id. The submitting process needs only a broker connection: it never imports the worker
module and never reads Celery results (the outcome travels back over wove's callback server), so no result backend
is needed and none is subscribed to.

Cancelling revokes the task with ``terminate=True``. The signal defaults to SIGKILL: the task body runs on a helper
thread of the pool child, so SIGTERM would give it no chance to clean up anyway, while SIGKILL also stops code stuck
in a C call. The prefork pool gives every child its own pipes, so killing one cannot wedge the pool; Celery replaces
the child at once. Only the prefork pool (and eventlet/gevent) can terminate a running task; with ``solo`` or
``threads`` a revoked task that already started runs to the end and its late frames are ignored.

Config keys (``executor_config``): ``app`` (an existing ``celery.Celery``) or ``broker_url`` (plus optional
``result_backend`` and ``app_config``) to create one; ``queue``; ``task_name``; ``send_task_options`` (passed to
``send_task``); ``cancel_signal``.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

from wove._types import Frame
from wove.errors import BackendUnavailableError, ConfigError, SubmitError, WoveError
from wove.integrations._batching import BatchSubmitter
from wove.integrations.base import BackendAdapter

__all__ = ["DEFAULT_QUEUE", "TASK_NAME", "CeleryAdapter"]

logger = logging.getLogger("wove.integrations.celery")

#: Name of the Celery task wove ships; workers register it (``wove.integrations.celery_worker``).
TASK_NAME = "wove.run_payload"
#: Queue payloads go to unless ``executor_config["queue"]`` says otherwise.
DEFAULT_QUEUE = "wove"
#: Signal ``revoke(terminate=True)`` sends to the pool child running a cancelled task.
DEFAULT_CANCEL_SIGNAL = "SIGKILL"
#: Attempts to reach the broker when the environment starts, before it is reported unavailable.
CONNECT_RETRIES = 2
#: ``send_task`` options the adapter sets unless ``send_task_options`` overrides them: wove never reads Celery
#: results (no result backend subscription per task), and a task sent from inside a Celery task is not its child.
SEND_DEFAULTS: Mapping[str, Any] = {"ignore_result": True, "add_to_parent": False}
#: Keys ``send_task_options`` may not hold: the adapter sets them for every payload.
RESERVED_OPTIONS = frozenset({"args", "kwargs", "task_id", "name", "argsrepr", "producer"})


class CeleryAdapter(BackendAdapter):
    """Sends payloads to Celery workers as calls of wove's shipped task; revokes them to cancel."""

    backend: ClassVar[str] = "celery"
    required_modules: ClassVar[tuple[str, ...]] = ("celery",)
    install_hint: ClassVar[str] = "pip install 'wove[celery]'"
    #: Brokers carry every message through memory (Redis) or disk (RabbitMQ), and some cap its size (SQS: 256 KiB
    #: after base64). Bodies above 32 KiB stay on the callback server and the worker fetches them.
    inline_payload_limit: ClassVar[int | None] = 32 * 1024

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        config = self.config
        self.queue = _text(config, "queue", DEFAULT_QUEUE)
        self.task_name = _text(config, "task_name", TASK_NAME)
        self.cancel_signal = _signal_name(config.get("cancel_signal", DEFAULT_CANCEL_SIGNAL))
        options = config.get("send_task_options") or {}
        if not isinstance(options, Mapping):
            raise ConfigError(f"executor_config['send_task_options'] must be a dict, got {options!r}")
        reserved = sorted(RESERVED_OPTIONS.intersection(options))
        if reserved:
            raise ConfigError(f"executor_config['send_task_options'] may not set {', '.join(reserved)}")
        self.send_options: dict[str, Any] = {**SEND_DEFAULTS, "queue": self.queue, **options}
        self._given_app: Any = config.get("app")
        if self._given_app is not None and not callable(getattr(self._given_app, "send_task", None)):
            raise ConfigError(f"executor_config['app'] must be a celery.Celery app, got {self._given_app!r}")
        if self._given_app is None and not config.get("broker_url"):
            raise ConfigError("the celery backend needs executor_config['app'] or executor_config['broker_url']")
        if not isinstance(config.get("app_config") or {}, Mapping):
            raise ConfigError(
                f"executor_config['app_config'] must be a dict of Celery settings, got {config['app_config']!r}"
            )
        self.app: Any = self._given_app
        self._sender: BatchSubmitter[tuple[Frame, Frame], str] = BatchSubmitter(self._send_many)
        self._closed = False

    # -- adapter contract ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the app (unless one was given) and open a broker connection, off the event loop."""
        with self._unavailable("start"):
            if self.app is None:
                self.app = await self.run_blocking(_create_app, self.config)
            await self.run_blocking(self._connect)

    async def submit(self, payload: Frame, frame: Frame) -> str:
        """Publish one call of the wove task; the run id is the Celery task id."""
        run_id = str(frame["run_id"])
        if self._closed:
            raise SubmitError("the celery adapter is closed", environment=self.name, run_id=run_id)
        with self.translate_errors("send_task", run_id=run_id):
            return await self._sender.submit((payload, frame))

    async def cancel(self, run_id: str, submission: Any, frame: Frame) -> None:
        """Revoke the task on every worker; a worker running it kills the pool child (``cancel_signal``)."""
        task_id = str(submission or run_id)
        with self.translate_errors("revoke", run_id=run_id):
            await self.run_blocking(self.app.control.revoke, task_id, terminate=True, signal=self.cancel_signal)
        logger.debug("environment %r: revoked celery task %s (%s)", self.name, task_id, self.cancel_signal)

    async def close(self) -> None:
        """Close the app's connection pools when the adapter created the app; a given app stays open."""
        if self._closed:
            return
        self._closed = True
        if self.app is not None and self._given_app is None:
            try:
                await self.run_blocking(self.app.close)
            except Exception:
                logger.warning("environment %r: closing the celery app failed", self.name, exc_info=True)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _send_many(self, batch: Sequence[tuple[Frame, Frame]]) -> list[str | BaseException]:
        """Publish a batch on one pooled producer, in a worker thread (one thread hop per batch, not per run)."""
        sent: list[str | BaseException] = []
        with self.app.producer_or_acquire() as producer:
            for payload, frame in batch:
                try:
                    result = self.app.send_task(
                        self.task_name,
                        args=(payload,),
                        task_id=str(frame["run_id"]),
                        producer=producer,
                        argsrepr=f"<wove task {frame.get('task_name')!r}>",  # what logs and Flower show
                        **self.send_options,
                    )
                    sent.append(str(result.id))
                except Exception as exc:
                    sent.append(exc)
        return sent

    def _connect(self) -> None:
        """Warm one pooled producer connection, so the first submission does not pay for it and a wrong URL fails
        here, once, rather than in every run."""
        with self.app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(
                max_retries=CONNECT_RETRIES, interval_start=0.2, interval_step=0.3, interval_max=1.0
            )

    @contextmanager
    def _unavailable(self, action: str) -> Iterator[None]:
        try:
            yield
        except WoveError:
            raise
        except Exception as exc:
            where = _broker_uri(self.app) or "the broker"
            message = f"environment {self.name!r} (celery): {action} failed at {where}: {type(exc).__name__}: {exc}"
            raise BackendUnavailableError(message, environment=self.name) from exc


def _create_app(config: Mapping[str, Any]) -> Any:
    """A Celery app of its own for this environment (``set_as_current=False``: the user's current app stays)."""
    from celery import Celery

    app = Celery("wove", broker=str(config["broker_url"]), backend=config.get("result_backend"), set_as_current=False)
    app.conf.update(dict(config.get("app_config") or {}))
    return app


def _broker_uri(app: Any) -> str:
    """The broker URL with its password masked, for messages."""
    try:
        with app.connection_for_write() as conn:
            return str(conn.as_uri())
    except Exception:
        return ""


def _text(config: Mapping[str, Any], key: str, default: str) -> str:
    value = config.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"executor_config[{key!r}] must be a non-empty string, got {value!r}")
    return value


def _signal_name(value: Any) -> str:
    """Normalise ``"SIGKILL"``, ``"KILL"``, ``9`` or ``signal.SIGKILL`` to the name Celery's ``revoke`` takes."""
    try:
        if isinstance(value, str):
            name = value.upper()
            return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"].name
        if isinstance(value, int) and not isinstance(value, bool):
            return signal.Signals(value).name
    except (KeyError, ValueError):
        pass
    raise ConfigError(f"executor_config['cancel_signal'] must name a signal such as 'SIGKILL', got {value!r}")
