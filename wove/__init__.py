"""wove: inline task orchestration whose selected tasks run on the task systems you already operate.

import wove
from wove import weave

with weave(order_id=7) as w:
    @w.do
    def order(order_id): ...

    @w.do(environment="reports")
    def report(order): ...

w.result.final
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wove.config import config
from wove.errors import (
    BackendUnavailableError,
    ConfigError,
    CycleError,
    DeliveryLostError,
    DeliveryTimeoutError,
    DispatchError,
    DuplicateTaskError,
    GraphError,
    MissingDependencyError,
    OrphanedRunError,
    PayloadError,
    RemoteTaskError,
    RunCancelledError,
    SubmitError,
    TaskTimeoutError,
    UnknownEnvironmentError,
    UpstreamFailedError,
    WoveError,
)
from wove.weave import Weave, weave

if TYPE_CHECKING:
    from wove.environment import EnvironmentExecutor, LocalEnvironmentExecutor
    from wove.result import RunRecord, WeaveResult

__version__ = "0.1.0"

# Loaded on first access so that ``import wove`` stays cheap (worker processes import it on every cold start).
_LAZY = {
    "EnvironmentExecutor": "wove.environment.base",
    "LocalEnvironmentExecutor": "wove.environment.local",
    "RunRecord": "wove.result",
    "WeaveResult": "wove.result",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wove' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def shutdown() -> None:
    """Stop every started environment and the runtime thread. Runs at interpreter exit on its own."""
    from wove.engine import shutdown_pools
    from wove.environment.runtime import shutdown as stop_runtime

    stop_runtime()
    shutdown_pools()


__all__ = [
    # the weave
    "weave",
    "Weave",
    "WeaveResult",
    "RunRecord",
    # configuration and lifecycle
    "config",
    "shutdown",
    # executors
    "EnvironmentExecutor",
    "LocalEnvironmentExecutor",
    # errors
    "WoveError",
    "ConfigError",
    "UnknownEnvironmentError",
    "GraphError",
    "DuplicateTaskError",
    "MissingDependencyError",
    "CycleError",
    "TaskTimeoutError",
    "UpstreamFailedError",
    "DispatchError",
    "BackendUnavailableError",
    "SubmitError",
    "DeliveryTimeoutError",
    "DeliveryLostError",
    "OrphanedRunError",
    "RunCancelledError",
    "RemoteTaskError",
    "PayloadError",
    "__version__",
]
