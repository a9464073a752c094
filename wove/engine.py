"""Runs a validated graph: each task starts the moment its last input exists.

Tasks of the weave's default environment, when it is ``local``, run right here in the weave's event loop
(async ones directly, sync ones in the environment's thread pool). Every other task is handed to the
process-wide executor runtime as a ``RunRequest``. Retries and timeouts wrap each attempt on both paths.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from wove import tracing
from wove.config import DELIVERY_KEYS, Settings
from wove.environment.runs import RunRequest
from wove.environment.runtime import CANCEL_ACK_TIMEOUT, get_runtime
from wove.errors import (
    ConfigError,
    DeliveryLostError,
    OrphanedRunError,
    TaskTimeoutError,
    UpstreamFailedError,
)
from wove.graph import Graph, Node
from wove.progress import maybe_display
from wove.result import RunRecord, WeaveResult

_HOST = socket.gethostname()
_PID = os.getpid()

_pools: dict[tuple[str, int | None], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def thread_pool(environment: str, max_workers: int | None) -> ThreadPoolExecutor:
    """The process-wide thread pool that runs an inline environment's sync tasks."""
    key = (environment, max_workers)
    pool = _pools.get(key)
    if pool is None:
        with _pools_lock:
            pool = _pools.get(key)
            if pool is None:
                pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"wove-{environment}")
                _pools[key] = pool
    return pool


def shutdown_pools() -> None:
    """Stop the inline thread pools (running tasks finish; new ones start fresh pools)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class Plan:
    """Everything resolved for one task before the weave starts."""

    environment: str
    inline: bool
    retries: int
    timeout: float | None
    workers: int | None
    delivery: Mapping[str, Any]
    pool: ThreadPoolExecutor | None


def plan_tasks(graph: Graph, weave_options: Mapping[str, Any], settings: Settings) -> dict[str, Plan]:
    """Resolve each task's environment and options (task -> weave -> environment -> global -> built-in)."""
    plans: dict[str, Plan] = {}
    shared: dict[Any, Plan] = {}  # tasks with the same options share one plan; most have none
    for name, node in graph.nodes.items():
        opts = node.spec.options
        try:
            key: Any = tuple(sorted(opts.items()))
            hash(key)
        except TypeError:
            key = None
        if key is not None and key in shared:
            plans[name] = shared[key]
            continue
        plans[name] = _plan(opts, weave_options, settings)
        if key is not None:
            shared[key] = plans[name]
    return plans


def _plan(opts: Mapping[str, Any], weave_options: Mapping[str, Any], settings: Settings) -> Plan:
    """Resolve one task's plan from its options, the weave's, and the configuration."""
    env = opts.get("environment") or weave_options.get("environment") or settings.default_environment
    settings.environment(env)  # UnknownEnvironmentError names the known ones, before anything runs
    inline = env == settings.default_environment and settings.environment_setting(env, "executor") == "local"
    delivery = {key[len("delivery_") :]: settings.resolve(key, env, opts, weave_options) for key in DELIVERY_KEYS}
    pool = thread_pool(env, settings.environment_setting(env, "max_workers")) if inline else None
    return Plan(
        environment=env,
        inline=inline,
        retries=settings.resolve("retries", env, opts, weave_options),
        timeout=settings.resolve("timeout", env, opts, weave_options),
        workers=settings.resolve("workers", env, opts, weave_options),
        delivery=delivery,
        pool=pool,
    )


async def _outlast_cancels(future: asyncio.Future[None], timeout: float) -> None:
    """Wait up to ``timeout`` for ``future`` even if this task is cancelled again meanwhile.

    A cancelled weave cancels its tasks once more while they wind down (``gather`` and the weave's own clean-up
    both do); the hand-off of a run's cancel to its backend must not be cut short by that, or the run would keep
    going after the weave reported it cancelled.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not future.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        try:
            await asyncio.wait_for(asyncio.shield(future), remaining)
        except asyncio.CancelledError:
            continue
        except asyncio.TimeoutError:
            return


def _idempotency_key(spec: Any, task: str, args: Mapping[str, Any]) -> str | None:
    if spec is None:
        return None
    try:
        key = spec(**args) if callable(spec) else str(spec).format_map(args)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ConfigError(f"task {task!r}: delivery_idempotency_key {spec!r} cannot be built: {exc!r}") from exc
    return str(key)


class WeaveEngine:
    """One execution of one graph."""

    def __init__(
        self,
        graph: Graph,
        inputs: Mapping[str, Any],
        plans: Mapping[str, Plan],
        error_mode: str,
        progress: bool | None = None,
    ) -> None:
        self._graph = graph
        self._inputs = inputs
        self._plans = plans
        self._raise = error_mode == "raise"
        self._weave_id = uuid.uuid4().hex[:12]
        self._values: dict[str, Any] = {}
        self._errors: dict[str, BaseException] = {}
        self._records: dict[str, list[RunRecord]] = {name: [] for name in graph.order}
        self._waiting = {name: len(node.upstream) for name, node in graph.nodes.items()}
        self._tasks: dict[str, asyncio.Future[Any]] = {}
        self._unfinished = len(graph.nodes)
        self._done: asyncio.Future[None] | None = None
        self._failure: BaseException | None = None
        self._progress = progress

    async def run(self) -> WeaveResult:
        """Run every task; in raise mode, the first failure cancels the rest and is raised."""
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        if self._unfinished == 0:
            self._done.set_result(None)
        for name, count in self._waiting.items():
            if count == 0:
                self._start(name)
        remote = {plan.environment for plan in self._plans.values() if not plan.inline}
        display = maybe_display(self._records, remote, self._progress)
        try:
            await self._done
        finally:
            await self._cancel_all()
            if display is not None:
                await display.stop()
        if self._failure is not None:
            raise self._failure
        return self.result()

    def result(self) -> WeaveResult:
        """What the weave produced so far: after a failure in raise mode, the values, errors and records
        of everything that finished, so a caller can see where each attempt ran and why it failed."""
        return WeaveResult(self._graph.order, self._values, self._errors, self._records)

    async def _cancel_all(self) -> None:
        running = [task for task in self._tasks.values() if not task.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    def _start(self, name: str) -> None:
        node = self._graph.nodes[name]
        plan = self._plans[name]
        if plan.inline and not plan.retries and plan.timeout is None and not node.spec.mapped:
            self._start_direct(node, plan)
            return
        self._tasks[name] = asyncio.get_running_loop().create_task(self._run_node(node))

    def _arguments(self, node: Node) -> dict[str, Any]:
        args = {param: self._values[param] for param in node.task_args}
        for param in node.input_args:
            args[param] = self._inputs[param]
        return args

    def _start_direct(self, node: Node, plan: Plan) -> None:
        """The common case (inline, one attempt, no timeout) without a wrapping task: most of a trivial
        task's cost in a large weave was the wrapper, not the task."""
        name = node.spec.name
        record = RunRecord(name, plan.environment, 1, host=_HOST, pid=_PID, status="running")
        record.submitted_at = record.started_at = time.time()
        self._records[name].append(record)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any]
        try:
            if node.spec.is_async:
                future = loop.create_task(node.spec.func(**self._arguments(node)))
            else:
                future = loop.run_in_executor(plan.pool, partial(node.spec.func, **self._arguments(node)))
        except Exception as exc:  # the call itself failed, e.g. a TypeError from the arguments
            record.finished_at, record.status, record.error = time.time(), "failed", exc
            self._finish(name, exc)
            return
        self._tasks[name] = future
        future.add_done_callback(partial(self._direct_done, name, record))

    def _direct_done(self, name: str, record: RunRecord, future: asyncio.Future[Any]) -> None:
        record.finished_at = time.time()
        if future.cancelled():
            record.status = "cancelled"
            return
        error = future.exception()
        if error is None:
            record.status = "succeeded"
            self._values[name] = future.result()
        else:
            record.status, record.error = "failed", error
        self._finish(name, error)

    def _finish(self, name: str, error: BaseException | None) -> None:
        assert self._done is not None
        self._unfinished -= 1
        if error is not None:
            self._errors[name] = error
            if self._raise and self._failure is None:
                self._failure = error
                if not self._done.done():
                    self._done.set_result(None)
                return
        for down in self._graph.downstream[name]:
            self._waiting[down] -= 1
            if self._waiting[down] == 0:
                failed = next((up for up in self._graph.nodes[down].upstream if up in self._errors), None)
                if failed is None:
                    self._start(down)
                else:
                    self._finish(down, UpstreamFailedError(down, failed))
        if self._unfinished == 0 and not self._done.done():
            self._done.set_result(None)

    async def _run_node(self, node: Node) -> None:
        name = node.spec.name
        try:
            args = self._arguments(node)
            if node.spec.mapped:
                value = await self._run_mapped(node, args)
            else:
                value = await self._attempts(node, args, None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._finish(name, exc)
            return
        self._values[name] = value
        self._finish(name, None)

    async def _run_mapped(self, node: Node, args: dict[str, Any]) -> list[Any]:
        source = node.spec.map_over
        if isinstance(source, str):
            source = self._values[source] if source in self._values else self._inputs[source]
        try:
            items = list(source)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"mapped task {node.spec.name!r} needs an iterable to map over, got {source!r}") from None
        workers = self._plans[node.spec.name].workers
        limit = asyncio.Semaphore(workers) if workers else None
        item_param = node.item_param
        assert item_param is not None

        async def one(index: int, item: Any) -> Any:
            call = {**args, item_param: item}
            if limit is None:
                return await self._attempts(node, call, index)
            async with limit:
                return await self._attempts(node, call, index)

        tasks = [asyncio.ensure_future(one(index, item)) for index, item in enumerate(items)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            pending = [task for task in tasks if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _attempts(self, node: Node, args: dict[str, Any], item: int | None) -> Any:
        name = node.spec.name
        plan = self._plans[name]
        attempts = plan.retries + 1
        attempt = 0
        while True:
            attempt += 1
            record = RunRecord(name, plan.environment, attempt, item=item)
            self._records[name].append(record)
            call = (
                self._call_inline(node, plan, args, record)
                if plan.inline
                else self._call_remote(node, plan, args, record, item)
            )
            try:
                if plan.timeout is None:
                    return await call
                try:
                    return await asyncio.wait_for(call, plan.timeout)
                except asyncio.TimeoutError:
                    record.status = "timed out"
                    raise TaskTimeoutError(name, plan.timeout) from None
            except asyncio.CancelledError:
                if record.status in ("pending", "running", "submitted"):
                    record.status = "cancelled"
                raise
            except Exception as exc:
                record.error = exc
                if attempt >= attempts or self._requeue_owned(plan, exc):
                    raise

    @staticmethod
    def _requeue_owned(plan: Plan, exc: Exception) -> bool:
        """With ``orphan_policy="requeue"`` the runtime already spent the retries on lost runs."""
        return plan.delivery.get("orphan_policy") == "requeue" and isinstance(
            exc, (DeliveryLostError, OrphanedRunError)
        )

    async def _call_inline(self, node: Node, plan: Plan, args: dict[str, Any], record: RunRecord) -> Any:
        record.host, record.pid = _HOST, _PID
        record.submitted_at = record.started_at = time.time()
        record.status = "running"
        try:
            if node.spec.is_async:
                result = await node.spec.func(**args)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(plan.pool, partial(node.spec.func, **args))
        except BaseException:
            record.finished_at = time.time()
            record.status = "failed"
            raise
        record.finished_at = time.time()
        record.status = "succeeded"
        return result

    async def _call_remote(
        self, node: Node, plan: Plan, args: dict[str, Any], record: RunRecord, item: int | None
    ) -> Any:
        name = node.spec.name
        delivery = dict(plan.delivery)
        delivery["idempotency_key"] = _idempotency_key(delivery.get("idempotency_key"), name, args)
        task_id = f"{self._weave_id}:{name}" if item is None else f"{self._weave_id}:{name}:{item}"
        requeues = plan.retries if delivery.get("orphan_policy") == "requeue" else 0
        parent = tracing.current_parent()  # the caller's span, if any: each run's span goes under it
        request = RunRequest(plan.environment, name, task_id, node.spec.func, args, delivery, record, requeues, parent)
        loop = asyncio.get_running_loop()
        runtime = get_runtime()
        handle = runtime.submit(request, loop, loop.create_future())
        try:
            return await handle.future
        except asyncio.CancelledError:
            handle.finished = loop.create_future()
            runtime.cancel(handle)
            await _outlast_cancels(handle.finished, CANCEL_ACK_TIMEOUT + 1)
            raise
