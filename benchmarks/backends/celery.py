"""Celery: a trivial function as a native Celery call and as a wove remote task, side by side on one worker.

Native: ``send_task(...).get()`` with Redis as broker and result backend. Wove: a weave with one remote task on the
``celery`` backend (the result comes back over the callback server; no result backend). Sequential calls alternate
native and wove, so both see the same machine load; then 500 native calls in flight at once, gathered, against one
weave mapping 500 items. The worker is the documented one, prefork with 2 children
(``celery -A wove.integrations.celery_worker worker``), with this module included for the native task.

Run: python benchmarks/backends/celery.py [--sequential 200] [--concurrent 500]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file, this module's directory comes first on sys.path, where this very file would shadow the celery package.
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

from celery import Celery, shared_task

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


@contextlib.contextmanager
def engine() -> Iterator[tuple[str, str]]:
    """Redis on loopback and a prefork worker; yields the broker and result backend URLs."""
    from tests.services.base import ManagedProcess
    from tests.services.redis import RedisServer

    with tempfile.TemporaryDirectory(prefix="wove-bench-celery-") as tmp:
        redis = RedisServer(Path(tmp) / "redis").start()
        broker, backend = redis.url(0), redis.url(1)
        command = [sys.executable, "-m", "celery", "-A", "wove.integrations.celery_worker", "worker"]
        command += ["--include", "benchmarks.backends.celery", "-Q", QUEUE, "-P", "prefork", "-c", str(CONCURRENCY)]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel=INFO"]
        env = {"WOVE_CELERY_BROKER_URL": broker, "WOVE_CELERY_RESULT_BACKEND": backend, "PYTHONPATH": str(ROOT)}
        worker = ManagedProcess(command, Path(tmp) / "worker.log", env=env, cwd=ROOT)
        try:
            deadline = time.monotonic() + 60
            while " ready." not in worker.output():
                if not worker.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"celery worker did not start:\n{worker.output()[-3000:]}")
                time.sleep(0.05)
            yield broker, backend
        finally:
            worker.stop(timeout=5)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.pid, signal.SIGKILL)
            redis.stop()


def run(sequential: int = 200, concurrent: int = 500) -> list[dict[str, Any]]:
    """Measure both sides on a fresh engine; one dict for Celery (medians in ms, throughputs in calls/s)."""
    import wove
    from wove import weave

    with engine() as (broker, backend):
        app = Celery("bench", broker=broker, backend=backend, set_as_current=False)
        config = {"broker_url": broker, "queue": QUEUE}
        wove.config(
            progress=False, environments={"default": {}, "jobs": {"executor": "celery", "executor_config": config}}
        )

        def native(value: int) -> Any:
            return app.send_task(NATIVE, args=(value,), queue=QUEUE).get(timeout=30)

        def woven(value: int) -> Any:
            with weave(value=value) as w:
                w.do(environment="jobs")(echo)
            return w.result.final

        try:
            for i in range(20):  # start the environment, fork-warm both pool children, open connections
                assert native(i) == i and woven(i) == i
            native_times, wove_times = [], []
            for i in range(sequential):
                for call, times in ((native, native_times), (woven, wove_times)):
                    began = time.perf_counter()
                    assert call(i) == i
                    times.append(time.perf_counter() - began)

            began = time.perf_counter()
            pending = [app.send_task(NATIVE, args=(i,), queue=QUEUE) for i in range(concurrent)]
            assert [result.get(timeout=60) for result in pending] == list(range(concurrent))
            native_rate = concurrent / (time.perf_counter() - began)

            began = time.perf_counter()
            with weave() as w:
                w.do(range(concurrent), environment="jobs")(echo)
            wove_rate = concurrent / (time.perf_counter() - began)
            assert w.result.final == list(range(concurrent))
        finally:
            wove.shutdown()
            app.close()
    return [
        {
            "engine": f"celery (prefork -c {CONCURRENCY})",
            "native_median_ms": round(statistics.median(native_times) * 1e3, 3),
            "wove_median_ms": round(statistics.median(wove_times) * 1e3, 3),
            "native_throughput": round(native_rate, 1),
            "wove_throughput": round(wove_rate, 1),
        }
    ]


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'engine':<22} {'native ms':>10} {'wove ms':>10} {'added ms':>9} {'native/s':>9} {'wove/s':>9} {'ratio':>6}"
    )
    for row in rows:
        added = row["wove_median_ms"] - row["native_median_ms"]
        ratio = row["wove_throughput"] / row["native_throughput"]
        print(
            f"{row['engine']:<22} {row['native_median_ms']:>10.2f} {row['wove_median_ms']:>10.2f} {added:>9.2f} "
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
