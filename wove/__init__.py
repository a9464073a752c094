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

from wove.config import config
from wove.environment import EnvironmentExecutor, LocalEnvironmentExecutor
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
from wove.result import RunRecord, WeaveResult
from wove.weave import Weave, weave

__version__ = "0.1.0"


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
