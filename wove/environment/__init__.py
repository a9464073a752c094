"""Environments: the executor contract, the built-in executors, and the runtime that drives them.

``BackendAdapterEnvironmentExecutor`` is imported lazily: it needs the ``dispatch`` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wove.environment.base import EnvironmentExecutor
from wove.environment.local import LocalEnvironmentExecutor
from wove.environment.runtime import ExecutorRuntime, get_runtime, shutdown

if TYPE_CHECKING:
    from wove.environment.remote import BackendAdapterEnvironmentExecutor

__all__ = [
    "BackendAdapterEnvironmentExecutor",
    "EnvironmentExecutor",
    "ExecutorRuntime",
    "LocalEnvironmentExecutor",
    "get_runtime",
    "shutdown",
]


def __getattr__(name: str) -> Any:
    if name == "BackendAdapterEnvironmentExecutor":
        from wove.environment.remote import BackendAdapterEnvironmentExecutor

        return BackendAdapterEnvironmentExecutor
    raise AttributeError(f"module 'wove.environment' has no attribute {name!r}")
