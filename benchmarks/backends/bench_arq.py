"""ARQ: a trivial function as a native ARQ job and as a wove remote task, side by side on one worker.

Native: ``enqueue_job`` then ``Job.result`` (polling Redis every millisecond; 10 ms while 500 jobs wait at once).
Wove: a weave with one remote task (the result comes back over the callback server), and a weave mapping 500 items.
Single calls alternate between the two; throughput is the median of three bursts each. Both run on the same ``arq``
worker process, whose ``WorkerSettings`` (below) registers the native function and ``wove_function``, polling its
queue every ``--poll-delay`` seconds (default 0.002).

Run with the ARQ environment (ARQ pins redis<6): .venv-arq/bin/python -m benchmarks.backends.bench_arq
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

from arq.connections import RedisSettings, create_pool
from arq.worker import func

from benchmarks.backends._side_by_side import (
    WorkerCommand,
    command_line,
    compare_interleaved,
    print_table,
    redis_and_workers,
)
from wove.integrations.arq_worker import DEFAULT_POLL_DELAY, wove_function

if TYPE_CHECKING:
    from tests.services.redis import RedisServer

QUEUE = "arq:bench"
NATIVE = "bench.echo"
POLL_DELAY = 0.002


async def echo(value: int) -> int:
    """The wove task."""
    return value


async def echo_job(ctx: dict[str, Any], value: int) -> int:
    """The native job: the same body, with ARQ's context argument."""
    return value


class WorkerSettings:
    """The benchmark's worker: the native job and wove's function on one queue."""

    functions = (func(echo_job, name=NATIVE), wove_function)
    redis_settings = RedisSettings.from_dsn(os.environ.get("WOVE_ARQ_REDIS_URL") or "redis://localhost:6379/0")
    queue_name = QUEUE
    poll_delay = float(os.environ.get("WOVE_ARQ_POLL_DELAY") or DEFAULT_POLL_DELAY)
    max_jobs = int(os.environ.get("WOVE_ARQ_MAX_JOBS") or 10)
    allow_abort_jobs = True


class NativeArq:
    """ARQ's own client on a private event loop: ``enqueue_job``, then ``Job.result`` polling Redis."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = self.loop.run_until_complete(create_pool(RedisSettings.from_dsn(url), default_queue_name=QUEUE))

    async def _call(self, value: int, poll_delay: float) -> Any:
        job = await self.pool.enqueue_job(NATIVE, value)
        assert job is not None
        return await job.result(timeout=60, poll_delay=poll_delay)

    def call(self, value: int) -> Any:
        return self.loop.run_until_complete(self._call(value, 0.001))

    def burst(self, n: int) -> list[Any]:
        async def all_at_once() -> list[Any]:
            return list(await asyncio.gather(*(self._call(i, 0.01) for i in range(n))))

        return self.loop.run_until_complete(all_at_once())

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.aclose())
        self.loop.close()


def run(sequential: int = 200, concurrent: int = 500, poll_delay: float = POLL_DELAY) -> list[dict[str, Any]]:
    """One row: native ARQ against wove on ARQ, on a Redis and a worker started (and stopped) here."""

    def worker(redis: RedisServer) -> list[WorkerCommand]:
        args = [sys.executable, "-m", "arq", "benchmarks.backends.bench_arq.WorkerSettings"]
        return [(args, {"WOVE_ARQ_REDIS_URL": redis.url(0), "WOVE_ARQ_POLL_DELAY": str(poll_delay)})]

    # The wove task by its importable name, as a user's module function would be (also when run as a script).
    task = importlib.import_module("benchmarks.backends.bench_arq").echo
    with redis_and_workers(worker) as redis:
        url = redis.url(0)
        native = NativeArq(url)
        try:
            environment = {"executor": "arq", "executor_config": {"redis_settings": url, "queue_name": QUEUE}}
            return [
                compare_interleaved(f"arq (poll {poll_delay} s)", native, environment, task, sequential, concurrent)
            ]
        finally:
            native.close()


if __name__ == "__main__":
    parser = command_line(__doc__ or "")
    parser.add_argument("--poll-delay", type=float, default=POLL_DELAY, help="the worker's poll_delay, in seconds")
    options = parser.parse_args()
    rows = run(options.sequential, options.concurrent, options.poll_delay)
    print_table(rows, f"{options.sequential} sequential, {options.concurrent} at once")
