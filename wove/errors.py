"""The exceptions wove raises, in one tree.

::

    WoveError
    ├── ConfigError (ValueError)             bad configuration values
    ├── UnknownEnvironmentError (NameError)  a task names an environment nobody configured
    ├── GraphError (ValueError)              the weave cannot be built; nothing ran
    │   ├── DuplicateTaskError
    │   ├── MissingDependencyError
    │   └── CycleError
    ├── TaskTimeoutError (TimeoutError)      one attempt of a task ran past its ``timeout``
    ├── UpstreamFailedError                  a task did not run because a task it needs failed
    ├── DispatchError                        a run could not be delivered or did not come back
    │   ├── BackendUnavailableError          the executor or its backend could not start
    │   ├── SubmitError                      the backend refused or failed a submission
    │   ├── DeliveryTimeoutError (TimeoutError)
    │   ├── DeliveryLostError                no frame within the heartbeat window
    │   ├── OrphanedRunError                 the run was pending when its executor stopped
    │   └── RunCancelledError                the backend cancelled a run nobody here asked to cancel
    ├── RemoteTaskError                      a remote exception that could not be rebuilt locally
    └── PayloadError (ValueError)            a payload or frame that cannot be decoded
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class WoveError(Exception):
    """Root of every error wove raises on its own account."""


class ConfigError(WoveError, ValueError):
    """A configuration value is invalid; the message lists what is allowed."""


class UnknownEnvironmentError(WoveError, NameError):
    """A task or weave names an environment that is not configured."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.environment = name
        self.known = tuple(sorted(known))
        listed = ", ".join(repr(k) for k in self.known) or "none"
        super().__init__(f"unknown environment {name!r}; configured environments: {listed}")


class GraphError(WoveError, ValueError):
    """The weave's task graph is invalid; raised before any task runs."""


class DuplicateTaskError(GraphError):
    """Two tasks in one weave share a name."""


class MissingDependencyError(GraphError):
    """A task parameter names no task and no weave input."""


class CycleError(GraphError):
    """Tasks depend on each other in a cycle."""

    def __init__(self, cycle: Sequence[str]) -> None:
        self.cycle = tuple(cycle)
        super().__init__("dependency cycle: " + " -> ".join(self.cycle))


class TaskTimeoutError(WoveError, TimeoutError):
    """One attempt of a task exceeded its ``timeout``."""

    def __init__(self, task: str, timeout: float) -> None:
        self.task = task
        self.timeout = timeout
        super().__init__(f"task {task!r} timed out after {timeout:g}s")


class UpstreamFailedError(WoveError):
    """A task was not run because a task it depends on failed (``error_mode="return"``)."""

    def __init__(self, task: str, upstream: str) -> None:
        self.task = task
        self.upstream = upstream
        super().__init__(f"task {task!r} did not run: upstream task {upstream!r} failed")


class DispatchError(WoveError):
    """A run could not be delivered to its environment or did not come back."""

    def __init__(self, message: str, *, environment: str | None = None, run_id: str | None = None) -> None:
        self.environment = environment
        self.run_id = run_id
        super().__init__(message)


class BackendUnavailableError(DispatchError):
    """An environment's executor or backend could not start (missing package, unreachable service)."""


class SubmitError(DispatchError):
    """The backend refused or failed a submission; nothing is running for this run."""


class DeliveryTimeoutError(DispatchError, TimeoutError):
    """No terminal frame arrived within ``delivery_timeout``; the run was cancelled."""


class DeliveryLostError(DispatchError):
    """No frame arrived within the heartbeat window: the worker is presumed dead."""


class OrphanedRunError(DispatchError):
    """The run was still pending when its executor stopped; the orphan policy decided its end."""


class RunCancelledError(DispatchError):
    """The backend reported the run cancelled (an operator or scheduler did it, not this weave)."""


class CallbackError(DispatchError):
    """A worker could not deliver a frame: the callback server refused it or stayed unreachable past the deadline."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        reason: str = "",
        run_id: str | None = None,
    ) -> None:
        #: HTTP status of the last answer, or ``None`` when the server was never reached.
        self.status = status
        #: Machine-readable refusal reason from the server's JSON body (e.g. ``"run_not_pending"``).
        self.reason = reason
        super().__init__(message, run_id=run_id)

    @property
    def duplicate_delivery(self) -> bool:
        """Whether the refusal means this worker holds a second delivery of a payload another delivery owns.

        At-least-once backends deliver again after a lost acknowledgement or a visibility timeout. The callback
        server refuses the copy before its task runs: ``run_already_started`` while the first delivery runs,
        ``run_not_pending`` once the run resolved or was given up. Task-system integrations end such a copy quietly.
        """
        return self.reason in ("run_already_started", "run_not_pending")


class RemoteTaskError(WoveError):
    """A remote task failed with an exception that could not be rebuilt in this process."""

    def __init__(self, error: dict[str, Any]) -> None:
        self.error = dict(error)
        self.kind = str(error.get("kind", "Exception"))
        self.remote_message = str(error.get("message", ""))
        self.remote_traceback = str(error.get("traceback", ""))
        super().__init__(f"{self.kind}: {self.remote_message}")


class PayloadError(WoveError, ValueError):
    """A payload, frame or encoded value could not be decoded."""
