"""ARQ: a trivial function as a native ARQ job and as a wove remote task, side by side on one worker.

Native: ``enqueue_job`` then ``Job.result`` (polling Redis every millisecond; 10 ms while 500 jobs wait at once).
Wove: a weave with one remote task (the result comes back over the callback server), and a weave mapping 500 items.
Single calls alternate between the two; throughput is the median of three bursts each. Both run on the same ``arq``
worker process, whose ``WorkerSettings`` (below) registers the native function and ``wove_function``, polling its
queue every ``--poll-delay`` seconds (default 0.002).

Run with the ARQ environment (ARQ pins redis<6): .venv-arq/bin/python benchmarks/backends/arq.py
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file, this module's directory comes first on sys.path, where this very file would shadow the arq package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(_HERE.parents[1]))

import argparse
import asyncio
import importlib
import os
from typing import Any

from arq.connections import RedisSettings, create_pool
from arq.worker import func

from benchmarks.backends._redis_queues import compare, print_table, redis_and_worker
from wove.integrations.arq_worker import DEFAULT_POLL_DELAY, wove_function

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

    def worker(url: str) -> tuple[list[str], dict[str, str]]:
        args = [sys.executable, "-m", "arq", "benchmarks.backends.arq.WorkerSettings"]
        return args, {"WOVE_ARQ_REDIS_URL": url, "WOVE_ARQ_POLL_DELAY": str(poll_delay)}

    # The wove task by its importable name, as a user's module function would be (also when run as a script).
    task = importlib.import_module("benchmarks.backends.arq").echo
    with redis_and_worker(worker) as (url, _):
        native = NativeArq(url)
        try:
            environment = {"executor": "arq", "executor_config": {"redis_settings": url, "queue_name": QUEUE}}
            return [compare("arq", native, environment, task, sequential, concurrent)]
        finally:
            native.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=500)
    parser.add_argument("--poll-delay", type=float, default=POLL_DELAY)
    options = parser.parse_args()
    rows = run(options.sequential, options.concurrent, options.poll_delay)
    print_table(
        rows, f"worker poll_delay {options.poll_delay}s; {options.sequential} sequential, {options.concurrent} at once"
    )
