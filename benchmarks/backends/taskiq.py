"""Taskiq: a trivial function as a native Taskiq task and as a wove remote task, side by side on one worker.

Native: ``kiq`` then ``wait_result`` on a Redis result backend (polling every millisecond; every 10 ms while 500
tasks wait at once). Wove: a weave with one remote task (the result comes back over the callback server, nothing is
polled), and a weave mapping 500 items. Single calls alternate between the two; throughput is the median of three
bursts each. Both run on the same ``taskiq worker`` (one process), whose broker (``worker_broker`` below) registers
the native task and the wove task on a ``ListQueueBroker``.

Run: python benchmarks/backends/taskiq.py
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file, this module's directory comes first on sys.path, where this file would shadow the taskiq package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(_HERE.parents[1]))

import argparse
import asyncio
import importlib
import os
from typing import Any

from taskiq import AsyncBroker
from taskiq.kicker import AsyncKicker
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

from benchmarks.backends._redis_queues import compare, print_table, redis_and_worker
from wove.integrations.taskiq_worker import register

QUEUE = "bench"
NATIVE = "bench.echo"


async def echo(value: int) -> int:
    """The function both sides run."""
    return value


def make_broker(url: str) -> AsyncBroker:
    return ListQueueBroker(url, queue_name=QUEUE).with_result_backend(RedisAsyncResultBackend(url))


def worker_broker() -> AsyncBroker:
    """The worker's broker (``taskiq worker benchmarks.backends.taskiq:worker_broker``): native task and wove's."""
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

    def worker(url: str) -> tuple[list[str], dict[str, str]]:
        args = [sys.executable, "-m", "taskiq", "worker", "benchmarks.backends.taskiq:worker_broker", "--workers", "1"]
        return [*args, "--log-level", "WARNING", "--shutdown-timeout", "1"], {"WOVE_TASKIQ_BROKER_URL": url}

    # The wove task by its importable name, as a user's module function would be (also when run as a script).
    task = importlib.import_module("benchmarks.backends.taskiq").echo
    with redis_and_worker(worker) as (url, _):
        native = NativeTaskiq(url)
        try:
            environment = {"executor": "taskiq", "executor_config": {"broker_url": url, "queue_name": QUEUE}}
            return [compare("taskiq", native, environment, task, sequential, concurrent)]
        finally:
            native.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=500)
    options = parser.parse_args()
    print_table(
        run(options.sequential, options.concurrent), f"{options.sequential} sequential, {options.concurrent} at once"
    )
