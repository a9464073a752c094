"""Shared by the ARQ and Taskiq benchmarks: a throwaway Redis and worker, the wove side of the measurement, a table.

Imports neither SDK, so each benchmark runs in whichever environment has its engine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from tests.services.base import ManagedProcess
from tests.services.redis import RedisServer

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def redis_and_worker(command: Callable[[str], tuple[Sequence[str], Mapping[str, str]]]) -> Iterator[tuple[str, Path]]:
    """Start Redis on loopback and the worker ``command(url)`` returns (args, env); yield the URL and a log dir."""
    with tempfile.TemporaryDirectory(prefix="wove-bench-") as tmp:
        redis = RedisServer(Path(tmp) / "redis").start()
        worker: ManagedProcess | None = None
        try:
            url = redis.url(0)
            args, env = command(url)
            pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
            worker = ManagedProcess(args, Path(tmp) / "worker.log", env={**env, "PYTHONPATH": pythonpath}, cwd=ROOT)
            yield url, Path(tmp)
        finally:
            if worker is not None:
                worker.stop(timeout=3)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(worker.pid, signal.SIGKILL)
            redis.stop()


class Native(Protocol):
    """The engine's own client, driven synchronously: one call and wait for its result, or ``n`` at once."""

    def call(self, value: int) -> Any: ...

    def burst(self, n: int) -> list[Any]: ...


def compare(
    engine: str,
    native: Native,
    environment: Mapping[str, Any],
    func: Callable[..., Any],
    sequential: int,
    concurrent: int,
    rounds: int = 3,
) -> dict[str, Any]:
    """Native calls against weaves with one remote ``func``, interleaved one by one so both meet the same noise;
    then ``rounds`` bursts of ``concurrent`` calls each way (a weave mapping ``func``), keeping the median rate."""
    import wove
    from wove import weave

    def one(value: int) -> Any:
        with weave(value=value) as w:
            w.do(environment="jobs")(func)
        return w.result.final

    def many(n: int) -> list[Any]:
        with weave() as w:
            w.do(range(n), environment="jobs")(func)
        result: list[Any] = w.result.final
        return result

    wove.config(progress=False, environments={"default": {}, "jobs": dict(environment)})
    try:
        for i in range(20):  # the worker has started, the environment too, connections are warm
            assert native.call(i) == i and one(i) == i
        native_times, wove_times = [], []
        for i in range(sequential):
            native_times.append(_timed(native.call, i, i))
            wove_times.append(_timed(one, i, i))
        native_rates, wove_rates = [], []
        expected = list(range(concurrent))
        for _ in range(rounds):
            native_rates.append(concurrent / _timed(native.burst, concurrent, expected))
            wove_rates.append(concurrent / _timed(many, concurrent, expected))
    finally:
        wove.shutdown()
    return {
        "engine": engine,
        "native_median_ms": round(statistics.median(native_times) * 1e3, 3),
        "wove_median_ms": round(statistics.median(wove_times) * 1e3, 3),
        "native_throughput": round(statistics.median(native_rates), 1),
        "wove_throughput": round(statistics.median(wove_rates), 1),
    }


def _timed(fn: Callable[[Any], Any], argument: Any, expected: Any) -> float:
    began = time.perf_counter()
    value = fn(argument)
    elapsed = time.perf_counter() - began
    assert value == expected, f"{fn.__name__} returned {value!r}"
    return elapsed


def print_table(rows: Sequence[Mapping[str, Any]], note: str = "") -> None:
    print(
        f"{'engine':<10} {'native ms':>10} {'wove ms':>10} {'added ms':>9} {'native/s':>10} {'wove/s':>10} {'ratio':>6}"
    )
    for row in rows:
        added = row["wove_median_ms"] - row["native_median_ms"]
        ratio = row["wove_throughput"] / row["native_throughput"]
        print(
            f"{row['engine']:<10} {row['native_median_ms']:>10.2f} {row['wove_median_ms']:>10.2f} {added:>9.2f} "
            f"{row['native_throughput']:>10.0f} {row['wove_throughput']:>10.0f} {ratio:>6.2f}"
        )
    if note:
        print(note)
