"""What a weave costs over running the same tasks with asyncio.gather or a ThreadPoolExecutor.

Cases, each measured side by side in one run (median of --repeat runs):
  * 200 async tasks sleeping 0.1 s         weave vs asyncio.gather
  * 200 sync tasks sleeping 0.1 s          weave vs ThreadPoolExecutor(200)
  * 10,000 trivial async tasks             weave vs asyncio.gather (overhead per task in microseconds)
  * 10,000 trivial sync tasks              weave vs ThreadPoolExecutor

Run: python benchmarks/weave_overhead.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import wove
from wove import weave


def timed(fn: Callable[[], Any], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def weave_of(n: int, body: Callable[..., Any]) -> None:
    with weave() as w:
        for i in range(n):
            w.do(_named(body, f"t{i}"))


def _named(body: Callable[..., Any], name: str) -> Callable[..., Any]:
    if asyncio.iscoroutinefunction(body):

        async def task() -> Any:
            return await body()

    else:

        def task() -> Any:  # type: ignore[misc]
            return body()

    task.__name__ = name
    return task


async def sleep_async() -> None:
    await asyncio.sleep(0.1)


def sleep_sync() -> None:
    time.sleep(0.1)


async def trivial_async() -> int:
    return 1


def trivial_sync() -> int:
    return 1


def gather_of(n: int, body: Callable[[], Any]) -> None:
    async def main() -> None:
        await asyncio.gather(*(body() for _ in range(n)))

    asyncio.run(main())


def pool_of(n: int, body: Callable[[], Any], workers: int) -> None:
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda _: body(), range(n)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    wove.config(environments={"default": {"executor": "local", "max_workers": 200}})

    rows: list[tuple[str, str, float, float]] = []
    r = args.repeat
    rows.append(
        ("200 async x sleep 0.1s", "asyncio.gather", timed(lambda: gather_of(200, sleep_async), r),
         timed(lambda: weave_of(200, sleep_async), r))
    )
    rows.append(
        ("200 sync x sleep 0.1s", "ThreadPoolExecutor(200)", timed(lambda: pool_of(200, sleep_sync, 200), r),
         timed(lambda: weave_of(200, sleep_sync), r))
    )
    rows.append(
        ("10,000 trivial async", "asyncio.gather", timed(lambda: gather_of(10_000, trivial_async), r),
         timed(lambda: weave_of(10_000, trivial_async), r))
    )
    rows.append(
        ("10,000 trivial sync", "ThreadPoolExecutor(200)", timed(lambda: pool_of(10_000, trivial_sync, 200), r),
         timed(lambda: weave_of(10_000, trivial_sync), r))
    )

    header = f"{'case':<24} {'baseline':<24} {'baseline s':>11} {'weave s':>9} {'ratio':>7} {'overhead/task':>14}"
    print(header)
    print("-" * len(header))
    for case, baseline, base, woven in rows:
        n = 10_000 if case.startswith("10,000") else 200
        per_task = (woven - base) / n * 1e6
        print(f"{case:<24} {baseline:<24} {base:>11.4f} {woven:>9.4f} {woven / base:>7.3f} {per_task:>11.1f} us")
    wove.shutdown()


if __name__ == "__main__":
    main()
