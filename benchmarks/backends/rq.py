"""RQ: a trivial function as a native RQ job and as a wove remote task, side by side on the same workers.

Native: ``Queue.enqueue`` then ``Job.latest_result(timeout=...)`` (RQ's blocking read of the job's result stream).
Wove: a weave with one remote task on the ``rq`` backend. Sequential calls alternate native and wove, so both see the
same machine load; then 500 native jobs enqueued at once and their results gathered, against one weave mapping 500
items. Two setups, two workers each (one per core): ``SimpleWorker`` (no fork per job) and the forking ``Worker``,
wove's subclasses that load its worker code at start, started as the docs say (``rq worker -u URL -w CLASS QUEUE``).

Run: python benchmarks/backends/rq.py [--sequential 200] [--concurrent 500]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file, this module's directory comes first on sys.path, where this very file would shadow the rq package.
_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse
import contextlib
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from typing import Any

QUEUE = "wove-bench"
#: The native job: an identity on ints that every worker has loaded already (a function of this module would be
#: imported afresh by each forked work horse, charging the native side for an import wove's side does not pay).
NATIVE = "operator.pos"
WORKERS = 2
SETUPS = {
    "rq SimpleWorker": "wove.integrations.rq_worker.SimpleWorker",
    "rq Worker (fork)": "wove.integrations.rq_worker.Worker",
}


def echo(value: int) -> int:
    """The wove task (pickled by value when this file runs as a script)."""
    return value


@contextlib.contextmanager
def engine(worker_class: str) -> Iterator[str]:
    """Redis on loopback and ``WORKERS`` workers of ``worker_class``; yields the Redis URL."""
    from tests.services.base import ManagedProcess
    from tests.services.redis import RedisServer

    with tempfile.TemporaryDirectory(prefix="wove-bench-rq-") as tmp:
        redis = RedisServer(Path(tmp) / "redis").start()
        url = redis.url(0)
        workers: list[ManagedProcess] = []
        try:
            for n in range(WORKERS):
                command = [sys.executable, "-m", "rq.cli", "worker", "-u", url, "-w", worker_class, QUEUE]
                env = {"PYTHONPATH": str(ROOT)}
                workers.append(ManagedProcess(command, Path(tmp) / f"worker{n}.log", env=env, cwd=ROOT))
            deadline = time.monotonic() + 60
            for worker in workers:
                while "Listening on" not in worker.output():
                    if not worker.alive() or time.monotonic() > deadline:
                        raise RuntimeError(f"rq worker did not start:\n{worker.output()[-3000:]}")
                    time.sleep(0.05)
            yield url
        finally:
            for worker in workers:
                worker.stop(timeout=5)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(worker.pid, signal.SIGKILL)
            redis.stop()


def measure(name: str, worker_class: str, sequential: int, concurrent: int) -> dict[str, Any]:
    from redis import Redis
    from rq import Queue

    import wove
    from wove import weave

    with engine(worker_class) as url:
        queue = Queue(QUEUE, connection=Redis.from_url(url))
        config = {"redis_url": url, "queue_name": QUEUE}
        environment = {"executor": "rq", "executor_config": config, "delivery_timeout": 60.0}
        wove.config(progress=False, environments={"default": {}, "jobs": environment})

        def native(value: int) -> Any:
            result = queue.enqueue(NATIVE, value).latest_result(timeout=30)
            assert result is not None
            return result.return_value

        def woven(value: int) -> Any:
            with weave(value=value) as w:
                w.do(environment="jobs")(echo)
            return w.result.final

        try:
            for i in range(20):  # start the environment, open connections
                assert native(i) == i and woven(i) == i
            native_times, wove_times = [], []
            for i in range(sequential):
                for call, times in ((native, native_times), (woven, wove_times)):
                    began = time.perf_counter()
                    assert call(i) == i
                    times.append(time.perf_counter() - began)

            began = time.perf_counter()
            jobs = [queue.enqueue(NATIVE, i) for i in range(concurrent)]
            results = [job.latest_result(timeout=60) for job in jobs]
            assert [result.return_value for result in results if result is not None] == list(range(concurrent))
            native_rate = concurrent / (time.perf_counter() - began)

            began = time.perf_counter()
            with weave() as w:
                w.do(range(concurrent), environment="jobs")(echo)
            wove_rate = concurrent / (time.perf_counter() - began)
            assert w.result.final == list(range(concurrent))
        finally:
            wove.shutdown()
    return {
        "engine": name,
        "native_median_ms": round(statistics.median(native_times) * 1e3, 3),
        "wove_median_ms": round(statistics.median(wove_times) * 1e3, 3),
        "native_throughput": round(native_rate, 1),
        "wove_throughput": round(wove_rate, 1),
    }


def run(sequential: int = 200, concurrent: int = 500) -> list[dict[str, Any]]:
    """Measure both sides on a fresh engine per setup; one dict per setup (ms medians, calls/s)."""
    return [measure(name, worker_class, sequential, concurrent) for name, worker_class in SETUPS.items()]


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'engine':<18} {'native ms':>10} {'wove ms':>10} {'added ms':>9} {'native/s':>9} {'wove/s':>9}"
    print(f"{header} {'ratio':>6}")
    for row in rows:
        added = row["wove_median_ms"] - row["native_median_ms"]
        ratio = row["wove_throughput"] / row["native_throughput"]
        print(
            f"{row['engine']:<18} {row['native_median_ms']:>10.2f} {row['wove_median_ms']:>10.2f} {added:>9.2f} "
            f"{row['native_throughput']:>9.0f} {row['wove_throughput']:>9.0f} {ratio:>6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=500)
    args = parser.parse_args()
    print_table(run(args.sequential, args.concurrent))


if __name__ == "__main__":
    main()
