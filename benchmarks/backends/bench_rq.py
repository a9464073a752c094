"""RQ: a trivial function as a native RQ job and as a wove remote task, side by side on the same workers.

Native: ``Queue.enqueue`` then ``Job.latest_result(timeout=...)`` (RQ's blocking read of the job's result stream).
Wove: a weave with one remote task on the ``rq`` backend. Sequential calls alternate native and wove, so both see the
same machine load; then 500 native jobs enqueued at once and their results gathered, against one weave mapping 500
items. Two setups, two workers each (one per core): ``SimpleWorker`` (no fork per job) and the forking ``Worker``,
wove's subclasses that load its worker code at start, started as the docs say (``rq worker -u URL -w CLASS QUEUE``).

Run: python -m benchmarks.backends.bench_rq [--sequential 200] [--concurrent 500]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis import Redis
from rq import Queue

from benchmarks.backends._side_by_side import (
    WorkerCommand,
    command_line,
    compare_interleaved,
    print_table,
    redis_and_workers,
)

if TYPE_CHECKING:
    from tests.services.redis import RedisServer

QUEUE = "wove-bench"
#: The native job: an identity on ints that every worker has loaded already (a function of this module would be
#: imported afresh by each forked work horse, charging the native side for an import wove's side does not pay).
NATIVE = "operator.pos"
WORKERS = 2
SETUPS = {
    "rq SimpleWorker": "wove.integrations.rq_worker.SimpleWorker",
    "rq Worker (fork)": "wove.integrations.rq_worker.Worker",
}


def _echo_by_value() -> Callable[[int], int]:
    """The wove task: an identity that cloudpickle ships by value however this module was loaded.

    A module-level function is pickled by reference when this module is imported by name (``python -m
    benchmarks.backends`` does), and every forked work horse would then import this module and everything it imports
    (argparse, statistics, ...) to unpickle it: about 10 ms a job that the native side, calling a function the
    worker loaded before forking, does not pay.
    """

    def echo(value: int) -> int:
        return value

    return echo


echo = _echo_by_value()


class NativeRQ:
    """RQ's own client: ``enqueue``, then ``latest_result``, which blocks on the job's result stream."""

    def __init__(self, url: str) -> None:
        self.queue = Queue(QUEUE, connection=Redis.from_url(url))

    def call(self, value: int) -> Any:
        result = self.queue.enqueue(NATIVE, value).latest_result(timeout=30)
        assert result is not None
        return result.return_value

    def burst(self, n: int) -> list[Any]:
        jobs = [self.queue.enqueue(NATIVE, i) for i in range(n)]
        results = [job.latest_result(timeout=60) for job in jobs]
        return [result.return_value for result in results if result is not None]


def measure(name: str, worker_class: str, sequential: int, concurrent: int) -> dict[str, Any]:
    def workers(redis: RedisServer) -> list[WorkerCommand]:
        command = [sys.executable, "-m", "rq.cli", "worker", "-u", redis.url(0), "-w", worker_class, QUEUE]
        return [(command, {})] * WORKERS

    with redis_and_workers(workers, ready="Listening on") as redis:
        url = redis.url(0)
        config = {"redis_url": url, "queue_name": QUEUE}
        environment = {"executor": "rq", "executor_config": config, "delivery_timeout": 60.0}
        return compare_interleaved(name, NativeRQ(url), environment, echo, sequential, concurrent)


def run(sequential: int = 200, concurrent: int = 500) -> list[dict[str, Any]]:
    """Measure both sides on a fresh engine per setup; one dict per setup (ms medians, calls/s)."""
    return [measure(name, worker_class, sequential, concurrent) for name, worker_class in SETUPS.items()]


if __name__ == "__main__":
    options = command_line(__doc__ or "").parse_args()
    print_table(run(options.sequential, options.concurrent))
