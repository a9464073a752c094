"""Side by side: an engine's own API and wove on that engine, measured the same way; shared by every benchmark here.

A measurement is a ``Row``: the median of ``sequential`` round trips, one after the other, and the throughput of
``concurrent`` calls at once. Two ways to compare, each giving one result row (medians in ms, calls/s):

- ``compare_interleaved``: native and wove calls alternate one by one, then bursts of ``concurrent`` calls alternate
  ``rounds`` times (median rate), so both sides meet the same load of a shared machine.
- ``compare``: whole measurements (``native(sequential, concurrent)`` against ``woven(...)``) alternate ``repeat``
  times, keeping the median of each figure: for engines whose calls cannot be interleaved cheaply.

Also: Redis and worker processes on loopback for the queue engines, the command line and the result table. Imports
no engine SDK, so each benchmark runs in whichever environment has its engine (ARQ's own, for one).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from tests.services.redis import RedisServer

ROOT = Path(__file__).resolve().parents[2]
#: Round trips on each side before anything is timed: the environment starts, connections and imports warm up.
WARM_UP = 20


class Row(NamedTuple):
    """A median round trip (ms) and a throughput (calls/s)."""

    median_ms: float
    throughput: float


#: ``native(sequential, concurrent)`` measures the engine's own API.
Native = Callable[[int, int], Row]


class Calls(Protocol):
    """One side, driven synchronously: one call and wait for its result, or ``n`` calls at once."""

    def call(self, value: int) -> Any: ...

    def burst(self, n: int) -> list[Any]: ...


class WoveCalls:
    """Wove's side: a weave with one remote ``func(value)``, or one weave mapping it over ``range(n)``."""

    def __init__(self, func: Callable[[int], Any]) -> None:
        self.func = func

    def call(self, value: int) -> Any:
        from wove import weave

        with weave(value=value) as w:
            w.do(environment="jobs")(self.func)
        return w.result.final

    def burst(self, n: int) -> list[Any]:
        from wove import weave

        with weave() as w:
            w.do(range(n), environment="jobs")(self.func)
        values: list[Any] = w.result.final
        return values


@contextlib.contextmanager
def wove_calls(environment: Mapping[str, Any], func: Callable[[int], Any]) -> Iterator[WoveCalls]:
    """Wove's side with ``environment`` as ``jobs``; wove's environments are stopped afterwards."""
    import wove

    wove.config(progress=False, environments={"default": {}, "jobs": dict(environment)})
    try:
        yield WoveCalls(func)
    finally:
        wove.shutdown()


def result_row(engine: str, native_ms: float, wove_ms: float, native_rate: float, wove_rate: float) -> dict[str, Any]:
    """One engine's figures, as every benchmark returns them and the table prints them."""
    return {
        "engine": engine,
        "native_median_ms": round(native_ms, 3),
        "wove_median_ms": round(wove_ms, 3),
        "native_throughput": round(native_rate, 1),
        "wove_throughput": round(wove_rate, 1),
    }


def compare_interleaved(
    engine: str,
    native: Calls,
    environment: Mapping[str, Any],
    func: Callable[[int], Any],
    sequential: int,
    concurrent: int,
    rounds: int = 3,
) -> dict[str, Any]:
    """``native`` calls against weaves running ``func`` on ``environment``, alternating call by call; then
    ``rounds`` bursts of ``concurrent`` calls each way, alternating, keeping the median rate."""
    with wove_calls(environment, func) as wove_side:
        for i in range(WARM_UP):
            assert native.call(i) == i and wove_side.call(i) == i
        native_times, wove_times = [], []
        for i in range(sequential):
            native_times.append(_timed(native.call, i, i))
            wove_times.append(_timed(wove_side.call, i, i))
        native_rates, wove_rates = [], []
        expected = list(range(concurrent))
        for _ in range(rounds):
            native_rates.append(concurrent / _timed(native.burst, concurrent, expected))
            wove_rates.append(concurrent / _timed(wove_side.burst, concurrent, expected))
    return result_row(
        engine,
        statistics.median(native_times) * 1e3,
        statistics.median(wove_times) * 1e3,
        statistics.median(native_rates),
        statistics.median(wove_rates),
    )


def measure(one: Callable[[int], Any], many: Callable[[int], list[Any]], sequential: int, concurrent: int) -> Row:
    """Time ``one(i)`` ``sequential`` times after a warm-up, then ``many(concurrent)`` once; check every value."""
    for i in range(WARM_UP):
        assert one(i) == i
    timings = [_timed(one, i, i) for i in range(sequential)]
    elapsed = _timed(many, concurrent, list(range(concurrent)))
    return Row(statistics.median(timings) * 1e3, concurrent / elapsed)


def measure_wove(environment: Mapping[str, Any], func: Callable[[int], Any], sequential: int, concurrent: int) -> Row:
    """Weaves with one remote ``func(value)`` one after the other, then one weave mapping it over ``concurrent``."""
    with wove_calls(environment, func) as side:
        return measure(side.call, side.burst, sequential, concurrent)


def compare(
    engine: str, native: Native, woven: Native, sequential: int, concurrent: int, repeat: int
) -> dict[str, Any]:
    """Alternate ``native`` and ``woven`` measurements ``repeat`` times; one result row of medians."""
    natives, wovens = [], []
    for _ in range(repeat):
        natives.append(native(sequential, concurrent))
        wovens.append(woven(sequential, concurrent))
    return result_row(
        engine,
        statistics.median(r.median_ms for r in natives),
        statistics.median(r.median_ms for r in wovens),
        statistics.median(r.throughput for r in natives),
        statistics.median(r.throughput for r in wovens),
    )


def _timed(fn: Callable[[Any], Any], argument: Any, expected: Any) -> float:
    began = time.perf_counter()
    value = fn(argument)
    elapsed = time.perf_counter() - began
    assert value == expected, f"{getattr(fn, '__name__', fn)} returned {value!r}"
    return elapsed


# -- engines on loopback ----------------------------------------------------------------------------------------------

#: A worker process to start: its command line and the environment variables it needs on top of ours.
WorkerCommand = tuple[Sequence[str], Mapping[str, str]]


@contextlib.contextmanager
def redis_and_workers(
    workers: Callable[[RedisServer], Sequence[WorkerCommand]], ready: str | None = None
) -> Iterator[RedisServer]:
    """Start Redis on loopback, then the workers ``workers(redis)`` lists, from the repository root (so they import
    ``benchmarks.*``); yield the Redis server once each worker's log shows ``ready`` (when given). Stops them all."""
    from tests.services.base import ManagedProcess
    from tests.services.redis import RedisServer

    with tempfile.TemporaryDirectory(prefix="wove-bench-") as tmp:
        redis = RedisServer(Path(tmp) / "redis").start()
        started: list[ManagedProcess] = []
        try:
            pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
            for n, (args, env) in enumerate(workers(redis)):
                log = Path(tmp) / f"worker{n}.log"
                started.append(ManagedProcess(args, log, env={**env, "PYTHONPATH": pythonpath}, cwd=ROOT))
            deadline = time.monotonic() + 60
            for worker in started:
                while ready is not None and ready not in worker.output():
                    if not worker.alive() or time.monotonic() > deadline:
                        raise RuntimeError(f"worker {worker.args} did not start:\n{worker.output()[-3000:]}")
                    time.sleep(0.05)
            yield redis
        finally:
            for worker in started:
                worker.stop(timeout=5)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(worker.pid, signal.SIGKILL)  # pool children, work horses
            redis.stop()


# -- command line and table -------------------------------------------------------------------------------------------


def command_line(doc: str, sequential: int = 200, concurrent: int = 500) -> argparse.ArgumentParser:
    """The options every benchmark takes; a module adds its own before parsing."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=sequential, help="round trips timed one after the other")
    parser.add_argument("--concurrent", type=int, default=concurrent, help="calls in flight at once")
    return parser


HEADER = (
    f"{'engine':<28} {'native ms':>10} {'wove ms':>9} {'added ms':>9} {'native/s':>9} {'wove/s':>8} {'wove/native':>12}"
)


def format_row(row: Mapping[str, Any]) -> str:
    native, wove = float(row["native_median_ms"]), float(row["wove_median_ms"])
    native_rate, wove_rate = float(row["native_throughput"]), float(row["wove_throughput"])
    return (
        f"{row['engine']!s:<28} {native:>10.2f} {wove:>9.2f} {wove - native:>9.2f} "
        f"{native_rate:>9.0f} {wove_rate:>8.0f} {wove_rate / native_rate:>12.2f}"
    )


def print_table(rows: Sequence[Mapping[str, Any]], note: str = "") -> None:
    print(HEADER)
    print("-" * len(HEADER))
    for row in rows:
        print(format_row(row))
    if note:
        print(note)
