"""Celery: a trivial function as a native Celery call and as a wove remote task, side by side on one worker.

Native: ``send_task(...).get()`` with Redis as broker and result backend. Wove: a weave with one remote task on the
``celery`` backend (the result comes back over the callback server; no result backend). Sequential calls alternate
native and wove, so both see the same machine load; then 500 native calls in flight at once, gathered, against one
weave mapping 500 items. The worker is the documented one, prefork with 2 children
(``celery -A wove.integrations.celery_worker worker``), with this module included for the native task.

Run: python -m benchmarks.backends.bench_celery [--sequential 200] [--concurrent 500]
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from celery import Celery, shared_task

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
NATIVE = "wove_bench.echo"
CONCURRENCY = 2


def echo(value: int) -> int:
    """The wove task."""
    return value


@shared_task(name=NATIVE)
def echo_task(value: int) -> int:
    """The native task: the same body, registered in the worker through ``--include``."""
    return value


class NativeCelery:
    """Celery's own client: ``send_task``, then ``AsyncResult.get`` from the Redis result backend."""

    def __init__(self, broker: str, backend: str) -> None:
        self.app = Celery("bench", broker=broker, backend=backend, set_as_current=False)

    def call(self, value: int) -> Any:
        return self.app.send_task(NATIVE, args=(value,), queue=QUEUE).get(timeout=30)

    def burst(self, n: int) -> list[Any]:
        pending = [self.app.send_task(NATIVE, args=(i,), queue=QUEUE) for i in range(n)]
        return [result.get(timeout=60) for result in pending]


def worker(redis: RedisServer) -> list[WorkerCommand]:
    """The documented prefork worker, with this module included for the native task."""
    command = [sys.executable, "-m", "celery", "-A", "wove.integrations.celery_worker", "worker"]
    command += ["--include", "benchmarks.backends.bench_celery", "-Q", QUEUE, "-P", "prefork", "-c", str(CONCURRENCY)]
    command += ["--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel=INFO"]
    return [(command, {"WOVE_CELERY_BROKER_URL": redis.url(0), "WOVE_CELERY_RESULT_BACKEND": redis.url(1)})]


def run(sequential: int = 200, concurrent: int = 500) -> list[dict[str, Any]]:
    """Measure both sides on a fresh engine; one dict for Celery (medians in ms, throughputs in calls/s)."""
    with redis_and_workers(worker, ready=" ready.") as redis:
        native = NativeCelery(redis.url(0), redis.url(1))
        environment = {"executor": "celery", "executor_config": {"broker_url": redis.url(0), "queue": QUEUE}}
        try:
            engine = f"celery (prefork -c {CONCURRENCY})"
            return [compare_interleaved(engine, native, environment, echo, sequential, concurrent, rounds=1)]
        finally:
            native.app.close()


if __name__ == "__main__":
    options = command_line(__doc__ or "").parse_args()
    print_table(run(options.sequential, options.concurrent))
