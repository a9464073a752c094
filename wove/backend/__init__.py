"""The backend callback transport and dispatch payload helpers.

Adapters use this package when a task leaves the local weave for a task system (Celery, Slurm, Ray, ...):
:func:`build_backend_payload` turns a ``run_task`` frame into a JSON-safe payload, a worker runs it with
:func:`run_backend_payload` (or ``python -m wove.backend_worker``), and :class:`BackendCallbackServer` receives the
worker's event frames back in the submitting process.

Names load on first use, so ``import wove.backend`` stays cheap and a worker never imports the server (or aiohttp).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wove.backend.aclient import post_event_async
    from wove.backend.client import post_event
    from wove.backend.codec import (
        build_backend_payload,
        build_backend_payload_for_run,
        deserialize_frame,
        payload_from_b64,
        payload_to_b64,
        serialize_frame,
    )
    from wove.backend.server import BackendCallbackServer
    from wove.backend.worker import run_backend_payload, run_backend_payload_async

__all__ = [
    "BackendCallbackServer",
    "build_backend_payload",
    "build_backend_payload_for_run",
    "deserialize_frame",
    "payload_from_b64",
    "payload_to_b64",
    "post_event",
    "post_event_async",
    "run_backend_payload",
    "run_backend_payload_async",
    "serialize_frame",
]

_HOMES = {
    "BackendCallbackServer": "server",
    "build_backend_payload": "codec",
    "build_backend_payload_for_run": "codec",
    "deserialize_frame": "codec",
    "payload_from_b64": "codec",
    "payload_to_b64": "codec",
    "post_event": "client",
    "post_event_async": "aclient",
    "run_backend_payload": "worker",
    "run_backend_payload_async": "worker",
    "serialize_frame": "codec",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'wove.backend' has no attribute {name!r}")
    try:
        __import__(f"wove.backend.{home}")
    except ImportError as exc:
        if exc.name != "aiohttp":
            raise
        from wove.errors import BackendUnavailableError

        raise BackendUnavailableError(f"{name} needs aiohttp: pip install 'wove[dispatch]'") from exc
    value = getattr(sys.modules[f"wove.backend.{home}"], name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
