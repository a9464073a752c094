"""Shared by the Dask and Ray benchmarks: the native and wove measurements, interleaved, and the result table.

A measurement is a ``Row``: the median of ``sequential`` round trips, one after the other, and the throughput of
``concurrent`` calls at once. ``compare`` alternates native and wove measurements ``repeat`` times and keeps the
median of each figure, so a burst of load on a shared machine does not land on one side only. Imports no engine SDK.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple


class Row(NamedTuple):
    """A median round trip (ms) and a throughput (calls/s)."""

    median_ms: float
    throughput: float


#: ``native(sequential, concurrent)`` measures the engine's own API.
Native = Callable[[int, int], Row]


def measure(one: Callable[[int], Any], many: Callable[[int], list[Any]], sequential: int, concurrent: int) -> Row:
    """Time ``one(i)`` ``sequential`` times after a warm-up, then ``many(concurrent)`` once; check every value."""
    for i in range(20):  # start the environment, warm connections and imports
        assert one(i) == i
    timings = []
    for i in range(sequential):
        began = time.perf_counter()
        assert one(i) == i
        timings.append(time.perf_counter() - began)
    began = time.perf_counter()
    values = many(concurrent)
    elapsed = time.perf_counter() - began
    assert values == list(range(concurrent))
    return Row(statistics.median(timings) * 1e3, concurrent / elapsed)


def measure_wove(environment: Mapping[str, Any], func: Callable[[int], Any], sequential: int, concurrent: int) -> Row:
    """Weaves with one remote ``func(value)`` one after the other, then one weave mapping it over ``concurrent``."""
    import wove
    from wove import weave

    wove.config(progress=False, environments={"default": {}, "jobs": dict(environment)})

    def one(value: int) -> Any:
        with weave(value=value) as w:
            w.do(environment="jobs")(func)
        return w.result.final

    def many(count: int) -> list[Any]:
        with weave() as w:
            w.do(range(count), environment="jobs")(func)
        values: list[Any] = w.result.final
        return values

    try:
        return measure(one, many, sequential, concurrent)
    finally:
        wove.shutdown()


def compare(
    engine: str, native: Native, woven: Native, sequential: int, concurrent: int, repeat: int
) -> dict[str, Any]:
    """Alternate ``native`` and ``woven`` ``repeat`` times; one result row of medians."""
    natives, wovens = [], []
    for _ in range(repeat):
        natives.append(native(sequential, concurrent))
        wovens.append(woven(sequential, concurrent))
    return {
        "engine": engine,
        "native_median_ms": round(statistics.median(r.median_ms for r in natives), 3),
        "wove_median_ms": round(statistics.median(r.median_ms for r in wovens), 3),
        "native_throughput": round(statistics.median(r.throughput for r in natives), 1),
        "wove_throughput": round(statistics.median(r.throughput for r in wovens), 1),
    }


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
