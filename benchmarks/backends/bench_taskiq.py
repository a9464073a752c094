"""Taskiq: a trivial function as a native Taskiq task and as a wove remote task, side by side on one worker.

Native: ``kiq`` then ``wait_result`` on a Redis result backend (polling every millisecond; every 10 ms while 500
tasks wait at once). Wove: a weave with one remote task (the result comes back over the callback server, nothing is
polled), and a weave mapping 500 items. Single calls alternate between the two; throughput is the median of three
bursts each. Both run on the same ``taskiq worker`` (one process), whose broker (``worker_broker`` below) registers
the native task and the wove task on a ``ListQueueBroker``.

Run: python -m benchmarks.backends.bench_taskiq [--sequential 200] [--concurrent 500]
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

from taskiq import AsyncBroker
from taskiq.kicker import AsyncKicker
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

from benchmarks.backends._side_by_side import (
    WorkerCommand,
    command_line,
    compare_interleaved,
    print_table,
    redis_and_workers,
)
from wove.integrations.taskiq_worker import register

if TYPE_CHECKING:
    from tests.services.redis import RedisServer

QUEUE = "bench"
NATIVE = "bench.echo"


async def echo(value: int) -> int:
    """The function both sides run."""
    return value


def make_broker(url: str) -> AsyncBroker:
    return ListQueueBroker(url, queue_name=QUEUE).with_result_backend(RedisAsyncResultBackend(url))


def worker_broker() -> AsyncBroker:
    """The worker's broker (``taskiq worker benchmarks.backends.bench_taskiq:worker_broker``): the native task and
    wove's."""
    broker = make_broker(os.environ["WOVE_TASKIQ_BROKER_URL"])
    broker.register_task(echo, task_name=NATIVE)
    register(broker)
    return broker


class NativeTaskiq:
    """Taskiq's own client on a private event loop: ``kiq``, then ``wait_result`` polling the result backend."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.broker = make_broker(url)
        self.loop.run_until_complete(self.broker.startup())
        self.kicker: AsyncKicker[Any, Any] = AsyncKicker(NATIVE, self.broker, {})

    async def _call(self, value: int, check_interval: float) -> Any:
        task = await self.kicker.kiq(value)
        return (await task.wait_result(check_interval=check_interval, timeout=60)).return_value

    def call(self, value: int) -> Any:
        return self.loop.run_until_complete(self._call(value, 0.001))

    def burst(self, n: int) -> list[Any]:
        async def all_at_once() -> list[Any]:
            return list(await asyncio.gather(*(self._call(i, 0.01) for i in range(n))))

        return self.loop.run_until_complete(all_at_once())

    def close(self) -> None:
        self.loop.run_until_complete(self.broker.shutdown())
        self.loop.close()


def run(sequential: int = 200, concurrent: int = 500) -> list[dict[str, Any]]:
    """One row: native Taskiq against wove on Taskiq, on a Redis and a worker started (and stopped) here."""

    def worker(redis: RedisServer) -> list[WorkerCommand]:
        args = [sys.executable, "-m", "taskiq", "worker", "benchmarks.backends.bench_taskiq:worker_broker"]
        args += ["--workers", "1", "--log-level", "WARNING", "--shutdown-timeout", "1"]
        return [(args, {"WOVE_TASKIQ_BROKER_URL": redis.url(0)})]

    # The wove task by its importable name, as a user's module function would be (also when run as a script).
    task = importlib.import_module("benchmarks.backends.bench_taskiq").echo
    with redis_and_workers(worker) as redis:
        url = redis.url(0)
        native = NativeTaskiq(url)
        try:
            environment = {"executor": "taskiq", "executor_config": {"broker_url": url, "queue_name": QUEUE}}
            return [compare_interleaved("taskiq", native, environment, task, sequential, concurrent)]
        finally:
            native.close()


if __name__ == "__main__":
    options = command_line(__doc__ or "").parse_args()
    rows = run(options.sequential, options.concurrent)
    print_table(rows, f"{options.sequential} sequential, {options.concurrent} at once")
