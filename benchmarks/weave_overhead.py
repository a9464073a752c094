"""What a weave costs over running the same tasks with asyncio.gather or a ThreadPoolExecutor.

Cases, each measured side by side in one run (median of --repeat runs): 200 async tasks sleeping 0.1 s,
200 sync tasks sleeping 0.1 s, 10,000 trivial async tasks and 10,000 trivial sync tasks. Each runs as a weave,
with asyncio.gather (sync bodies through run_in_executor) and, for sync bodies, with ThreadPoolExecutor.map.
Every thread pool has 200 threads and is created once, as wove's are.

Run: python benchmarks/weave_overhead.py [--repeat 9]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import wove
from wove import weave

_POOL = ThreadPoolExecutor(200)


def timed(fn: Callable[[], Any], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _named(body: Callable[..., Any], name: str) -> Callable[..., Any]:
    if asyncio.iscoroutinefunction(body):

        async def task() -> Any:
            return await body()

    else:

        def task() -> Any:  # type: ignore[misc]
            return body()

    task.__name__ = name
    return task


def weave_of(n: int, body: Callable[..., Any]) -> None:
    with weave() as w:
        for i in range(n):
            w.do(_named(body, f"t{i}"))


def gather_of(n: int, body: Callable[[], Any]) -> None:
    async def run_all() -> None:
        if asyncio.iscoroutinefunction(body):
            await asyncio.gather(*(body() for _ in range(n)))
        else:
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(_POOL, body) for _ in range(n)))

    asyncio.run(run_all())


def pool_of(n: int, body: Callable[[], Any]) -> None:
    list(_POOL.map(lambda _: body(), range(n)))


async def sleep_async() -> None:
    await asyncio.sleep(0.1)


def sleep_sync() -> None:
    time.sleep(0.1)


async def trivial_async() -> int:
    return 1


def trivial_sync() -> int:
    return 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    wove.config(environments={"default": {"executor": "local", "max_workers": 200}})
    cases = [
        ("200 async x sleep 0.1s", 200, sleep_async),
        ("200 sync x sleep 0.1s", 200, sleep_sync),
        ("10,000 trivial async", 10_000, trivial_async),
        ("10,000 trivial sync", 10_000, trivial_sync),
    ]
    header = f"{'case':<24} {'gather s':>9} {'pool s':>9} {'weave s':>9} {'weave/gather':>13} {'overhead/task':>14}"
    print(header)
    print("-" * len(header))
    for case, n, body in cases:
        gathered = timed(partial(gather_of, n, body), args.repeat)
        is_async = asyncio.iscoroutinefunction(body)
        pool_text = f"{'-':>9}" if is_async else f"{timed(partial(pool_of, n, body), args.repeat):>9.4f}"
        woven = timed(partial(weave_of, n, body), args.repeat)
        per_task = (woven - gathered) / n * 1e6
        print(f"{case:<24} {gathered:>9.4f} {pool_text} {woven:>9.4f} {woven / gathered:>13.3f} {per_task:>11.1f} us")
    wove.shutdown()


if __name__ == "__main__":
    main()
