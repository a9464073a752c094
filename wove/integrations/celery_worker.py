"""The Celery side of wove: the task workers run, and a ready app for ``celery -A``.

Start workers for the ``celery`` backend with the app configured here from environment variables::

    WOVE_CELERY_BROKER_URL=redis://broker:6379/0 \\
        celery -A wove.integrations.celery_worker worker -Q wove --pool=prefork --concurrency=8

- ``WOVE_CELERY_BROKER_URL``: the broker (else Celery's own ``CELERY_BROKER_URL``, else its default).
- ``WOVE_CELERY_RESULT_BACKEND``: optional; wove does not need one.
- ``WOVE_CELERY_QUEUE``: the default queue of this app (``"wove"``); ``-Q`` overrides it.
- ``WOVE_CELERY_CONFIG``: a module (or ``module:object``) of further Celery settings, loaded with
  ``config_from_object``.

Workers of an app you already run need one line instead, then ``-Q wove`` (or your ``queue``)::

    from wove.integrations.celery_worker import register
    register(app)

The app is created when ``celery -A`` first looks it up, so importing ``register`` creates none. The task is
``acks_late``: a worker that dies before finishing leaves the message to be redelivered. A copy that
arrives after its run resolved (the worker died between posting the result and acknowledging) is refused by the
callback server before the task body runs and ends quietly, so every run resolves exactly once.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

from celery import Celery

from wove.integrations._redelivery import run_beside_main_thread, run_delivery
from wove.integrations.celery import DEFAULT_QUEUE, TASK_NAME

with contextlib.suppress(ImportError):  # unpickles callables shipped by value: loaded once, before the pool forks
    import cloudpickle  # noqa: F401

__all__ = ["TASK_NAME", "app", "create_app", "register", "run_payload"]

logger = logging.getLogger("wove.integrations.celery_worker")

#: Options of the registered task, unless ``register`` is given others. ``acks_late`` keeps a message until its run
#: finished; the prefetch multiplier of the shipped app is 1 to match, so a long task never sits on prefetched work.
TASK_OPTIONS: Mapping[str, Any] = {
    "acks_late": True,
    "reject_on_worker_lost": False,
    "ignore_result": True,
    "typing": False,
}


def run_payload(payload: Mapping[str, Any]) -> None:
    """Body of the Celery task: run one wove payload and report to the weave; returns ``None``.

    The task's own exception is re-raised after the weave got it, so Celery records the task as failed. A delivery of
    a run that is no longer pending (a duplicate) returns without running anything.
    """
    if _sigterm_is_the_workers():
        run_beside_main_thread(payload, logger)
    else:
        run_delivery(payload, logger)


def _sigterm_is_the_workers() -> bool:
    """True in the ``solo`` pool, which runs tasks in the worker's main thread, where SIGTERM asks Celery for a warm
    shutdown. In a prefork child SIGTERM means "terminate this child" (a revoke), which wove turns into a cancel."""
    if threading.current_thread() is not threading.main_thread():
        return False
    return getattr(signal.getsignal(signal.SIGTERM), "__module__", None) == "celery.apps.worker"


def register(app: Any, *, name: str = TASK_NAME, **options: Any) -> Any:
    """Register wove's task on ``app`` under ``name`` (the adapter's ``task_name``) and return it.

    ``options`` override :data:`TASK_OPTIONS` (any ``@app.task`` option: ``acks_late``, ``time_limit``, ...).
    Registering twice returns the task already registered.
    """
    existing = getattr(app, "_tasks", {}).get(name)  # not ``app.tasks``: that would finalize the app early
    if existing is not None:
        return existing
    return app.task(name=name, **{**TASK_OPTIONS, **options})(run_payload)


def create_app(environ: Mapping[str, str] | None = None) -> Any:
    """A Celery app for wove workers, configured from ``WOVE_CELERY_*`` variables, with the task registered."""
    env = os.environ if environ is None else environ
    created = Celery(
        "wove", broker=env.get("WOVE_CELERY_BROKER_URL") or None, backend=env.get("WOVE_CELERY_RESULT_BACKEND") or None
    )
    settings = _settings_object(env.get("WOVE_CELERY_CONFIG"))
    if settings is not None:
        created.config_from_object(settings)
    # wove's defaults, except where the WOVE_CELERY_CONFIG module chose otherwise
    defaults = {
        "task_default_queue": env.get("WOVE_CELERY_QUEUE") or DEFAULT_QUEUE,
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
    }
    created.conf.update({key: value for key, value in defaults.items() if not hasattr(settings, key)})
    register(created)
    return created


def _settings_object(path: str | None) -> Any:
    """The module (``"myproject.celeryconfig"``) or object (``"myproject.settings:CELERY"``) ``path`` names."""
    if not path:
        return None
    module, _, attribute = path.partition(":")
    found = importlib.import_module(module)
    return getattr(found, attribute) if attribute else found


#: The app ``celery -A wove.integrations.celery_worker`` finds; created on first access by ``__getattr__``.
app: Any
_app: Any = None


def __getattr__(name: str) -> Any:
    """``app`` is created on first access (``celery -A`` looks it up), so importing ``register`` has no side effects."""
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        _app = create_app()
    return _app
