"""``weave``: the context manager in which a workflow is written inline.

Tasks are declared in the ``with`` body with ``@w.do``; the graph is built, validated and run when the body
ends. ``with weave()`` works in plain code, in threads, and even when called from code that already runs an
event loop (it then runs on a helper thread); ``async with weave()`` runs in the caller's loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

from wove.config import TASK_KEYS, WEAVE_KEYS, current_settings, validate_options
from wove.errors import GraphError, WoveError

# The engine (asyncio, threads, the runtime) loads when a weave first runs, not at ``import wove``:
# worker processes import this package too, and their cold start matters.
if TYPE_CHECKING:
    from wove.graph import TaskSpec
    from wove.result import WeaveResult

F = TypeVar("F", bound=Callable[..., Any])


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: Marks an option that was not given, so it inherits; unlike ``None``, which may be a real value.
UNSET: Any = _Unset()


class Weave:
    """One inline workflow. Create it with ``weave(...)``; declare tasks with ``@w.do``."""

    def __init__(self, inputs: Mapping[str, Any], options: Mapping[str, Any]) -> None:
        self._inputs = dict(inputs)
        self._options = validate_options(options, WEAVE_KEYS, "weave()")
        self._specs: list[TaskSpec] = []
        self._result: WeaveResult | None = None
        self._state = "open"

    # -- declaring tasks --------------------------------------------------------------------------------------

    @overload
    def do(self, func: F, /) -> F: ...

    @overload
    def do(self, map_over: str | Iterable[Any] | None = None, /, **options: Any) -> Callable[[F], F]: ...

    def do(self, target: Any = None, /, **options: Any) -> Any:
        """Declare a task. ``@w.do``; ``@w.do(retries=2, timeout=5.0, environment="reports")``;
        ``@w.do("upstream", workers=4)`` maps the task over an upstream result, an input, or any iterable."""
        from wove.graph import TaskSpec

        if callable(target) and not options:
            self._add(TaskSpec.from_function(target, {}))
            return target
        checked = validate_options(options, TASK_KEYS, "@w.do")
        mapped = target is not None
        if mapped and not isinstance(target, str) and not isinstance(target, Iterable):
            raise GraphError(
                f"@w.do's first argument must name a task or input to map over, or be an iterable; got {target!r}"
            )

        def declare(func: F) -> F:
            self._add(TaskSpec.from_function(func, checked, map_over=target, mapped=mapped))
            return func

        return declare

    def _add(self, spec: TaskSpec) -> None:
        if self._state != "open":
            raise WoveError(f"cannot declare task {spec.name!r}: this weave has already run")
        self._specs.append(spec)

    # -- results ----------------------------------------------------------------------------------------------

    @property
    def result(self) -> WeaveResult:
        """Task values by name (``w.result.name``, ``w.result["name"]``, ``w.result.final``).

        Also set when the weave raised: ``w.result.errors`` and ``w.result.records`` then show what failed
        and where everything ran."""
        if self._result is None:
            raise WoveError("w.result is available once the weave's with-block has finished")
        return self._result

    # -- running ----------------------------------------------------------------------------------------------

    async def _run(self) -> WeaveResult:
        from wove.engine import WeaveEngine, plan_tasks
        from wove.graph import build_graph

        self._state = "running"
        settings = current_settings()
        graph = build_graph(self._specs, self._inputs)
        plans = plan_tasks(graph, self._options, settings)
        env = self._options.get("environment") or settings.default_environment
        error_mode = settings.resolve("error_mode", env, self._options)
        engine = WeaveEngine(graph, self._inputs, plans, error_mode, settings.progress)
        try:
            return await engine.run()
        finally:
            self._result = engine.result()
            self._state = "done"

    def _run_sync(self) -> None:
        import asyncio
        import threading

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(self._run())
            return
        # Called from code that already runs a loop: a sync with-block must block, so run on a helper thread,
        # in a copy of the caller's context (an OpenTelemetry span, say, stays current for the weave).
        import contextvars

        outcome: list[BaseException] = []
        context = contextvars.copy_context()

        def target() -> None:
            try:
                context.run(asyncio.run, self._run())
            except BaseException as exc:  # re-raised in the calling thread
                outcome.append(exc)

        thread = threading.Thread(target=target, name="wove-weave")
        thread.start()
        thread.join()
        if outcome:
            raise outcome[0]

    def __enter__(self) -> Weave:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._state = "done"
            return
        self._run_sync()

    async def __aenter__(self) -> Weave:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._state = "done"
            return
        await self._run()


def weave(
    *,
    inputs: Mapping[str, Any] | None = None,
    environment: str | None = UNSET,
    error_mode: str = UNSET,
    retries: int = UNSET,
    timeout: float | None = UNSET,
    workers: int | None = UNSET,
    delivery_timeout: float | None = UNSET,
    delivery_heartbeat_seconds: float | None = UNSET,
    delivery_cancel_mode: str = UNSET,
    delivery_orphan_policy: str = UNSET,
    delivery_idempotency_key: Any = UNSET,
    delivery_max_in_flight: int | None = UNSET,
    **named_inputs: Any,
) -> Weave:
    """Start an inline workflow: ``with weave(order_id=7) as w:`` or ``async with weave() as w:``.

    Keyword arguments that are not options become inputs that task parameters can name. An input whose name
    collides with an option goes in ``inputs={...}``. Options set here apply to every task of this weave
    unless the task sets its own.
    """
    options = {
        "environment": environment,
        "error_mode": error_mode,
        "retries": retries,
        "timeout": timeout,
        "workers": workers,
        "delivery_timeout": delivery_timeout,
        "delivery_heartbeat_seconds": delivery_heartbeat_seconds,
        "delivery_cancel_mode": delivery_cancel_mode,
        "delivery_orphan_policy": delivery_orphan_policy,
        "delivery_idempotency_key": delivery_idempotency_key,
        "delivery_max_in_flight": delivery_max_in_flight,
    }
    given = {key: value for key, value in options.items() if value is not UNSET}
    merged = dict(inputs or {})
    overlap = set(merged) & set(named_inputs)
    if overlap:
        raise WoveError(f"input(s) given twice: {', '.join(sorted(overlap))}")
    merged.update(named_inputs)
    return Weave(merged, given)
