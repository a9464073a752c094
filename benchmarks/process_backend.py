"""The embedded ``process`` backend against ``concurrent.futures.ProcessPoolExecutor``, and what a second weave
on an already started environment costs.

Cases, side by side in one run:
  * 1,000 mapped tasks (0.1-0.15 ms of CPU each here; ``--steps`` makes them larger) on a 2-worker ``process``
    environment vs. the same function mapped on a 2-worker ProcessPoolExecutor (pools started and warm before
    timing in both), alternating pair by pair.
    Then one more round of each with CPU time taken per thread and per process: where each task's CPU goes
    (steadier than wall time on a shared machine, where other tenants take CPU and time).
  * ``--one-at-a-time`` adds a pool that hands out one run per worker (``prefetch: 1``): what prefetching and
    posting outcomes together buy; ``--tcp`` one whose workers call back over TCP; ``--bare`` the pipeline of
    ``process_floor.py`` (one request per run, nothing of wove around it).
  * A weave with one trivial remote task on a started environment: the first weave (which starts the
    environment) and the median of the following ones; and the same weave with a local task, for reference.

Run: python benchmarks/process_backend.py [--tasks 1000] [--repeat 9] [--steps 2000] [--tcp] [--one-at-a-time]
     [--bare]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import psutil
from process_floor import BarePipeline

import wove
from wove import weave
from wove.environment.event_loop import runtime_loop_kind

#: Loop iterations of ``work``: about 0.1-0.15 ms of CPU here (``--steps`` sets it).
STEPS = 2_000


def work(item: int, steps: int = STEPS) -> int:
    """A small CPU-bound step, the same in both runners."""
    total = 0
    for i in range(steps):
        total = (total + item * i) % 1_000_003
    return total


def timed(fn: Callable[[], Any], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def weave_map(n: int, steps: int = STEPS, environment: str = "heavy") -> list[int]:
    with weave(items=range(n)) as w:

        @w.do("items", environment=environment)
        def mapped(item: int) -> int:
            return work(item, steps)

    result: list[int] = w.result.mapped
    return result


def one_task(environment: str) -> None:
    with weave() as w:

        @w.do(environment=environment)
        def ping() -> int:
            return 1


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def cpu_per_task(fn: Callable[[], Any], tasks: int) -> dict[str, float]:
    """Microseconds of CPU per task spent by each thread of this process and by its child processes together."""
    me = psutil.Process()
    children = me.children(recursive=True)
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    threads_before = {t.id: t.user_time + t.system_time for t in me.threads()}
    children_before = [cpu_seconds(child) for child in children]
    fn()
    spent: dict[str, float] = {}
    for thread in me.threads():
        used = thread.user_time + thread.system_time - threads_before.get(thread.id, 0.0)
        name = names.get(thread.id, "other threads")
        spent[name] = spent.get(name, 0.0) + used / tasks * 1e6
    workers = sum(cpu_seconds(c) - b for c, b in zip(children, children_before, strict=True))
    spent["worker processes"] = workers / tasks * 1e6
    return {name: us for name, us in spent.items() if us >= 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=STEPS, help="size of each task (loop iterations)")
    parser.add_argument("--tcp", action="store_true", help="also run a pool whose workers call back over TCP")
    parser.add_argument(
        "--one-at-a-time", action="store_true", help="also run a pool that hands out one run per worker (prefetch 1)"
    )
    parser.add_argument("--bare", action="store_true", help="also run the bare pipeline of process_floor.py")
    args = parser.parse_args()
    pool_config = {"workers": args.workers, "min_workers": args.workers}
    wove.config(
        progress=False,
        environments={
            "default": {"executor": "local"},
            "heavy": {"executor": "process", "executor_config": pool_config},
            "heavy-tcp": {"executor": "process", "executor_config": {**pool_config, "callback_socket": False}},
            "heavy-single": {"executor": "process", "executor_config": {**pool_config, "prefetch": 1}},
        },
    )

    first_start = time.perf_counter()
    one_task("heavy")
    first = time.perf_counter() - first_start
    weave_map(args.workers * 4)  # every worker warm

    steps = args.steps
    assert weave_map(10, steps) == [work(i, steps) for i in range(10)]
    task = functools.partial(work, steps=steps)
    if args.tcp:
        weave_map(args.workers * 4, steps, "heavy-tcp")
    if args.one_at_a_time:
        weave_map(args.workers * 4, steps, "heavy-single")
    bare = BarePipeline(args.workers, "process_backend:work") if args.bare else None
    if bare is not None:
        assert bare.map((i, steps) for i in range(10)) == [work(i, steps) for i in range(10)]
    tcp_ratios: list[float] = []
    single_ratios: list[float] = []
    bare_ratios: list[float] = []
    with ProcessPoolExecutor(args.workers) as pool:
        list(pool.map(task, range(args.workers * 4)))  # warm
        # Alternate the runners, so all see the same machine: other tenants' load comes and goes within seconds.
        pairs = []
        for _ in range(args.repeat):
            pooled_once = timed(lambda: list(pool.map(task, range(args.tasks))), 1)
            pairs.append((pooled_once, timed(lambda: weave_map(args.tasks, steps), 1)))
            if args.tcp:
                tcp_ratios.append(timed(lambda: weave_map(args.tasks, steps, "heavy-tcp"), 1) / pooled_once)
            if args.one_at_a_time:
                single_ratios.append(timed(lambda: weave_map(args.tasks, steps, "heavy-single"), 1) / pooled_once)
            if bare is not None:
                bare_ratios.append(timed(lambda: bare.map((i, steps) for i in range(args.tasks)), 1) / pooled_once)
        pool_cpu = cpu_per_task(lambda: list(pool.map(task, range(args.tasks))), args.tasks)
    pooled = statistics.median(p for p, _ in pairs)
    woven = statistics.median(w for _, w in pairs)
    ratios = sorted(w / p for p, w in pairs)
    weave_cpu = cpu_per_task(lambda: weave_map(args.tasks, steps), args.tasks)
    runners = [("ProcessPoolExecutor", pool_cpu), ("weave on 'process'", weave_cpu)]
    if bare is not None:
        runners.append(
            ("bare pipeline", cpu_per_task(lambda: bare.map((i, steps) for i in range(args.tasks)), args.tasks))
        )
        bare.close()
    own = min(timed(lambda: work(7, steps), 1) for _ in range(200)) * 1e6

    later = [timed(lambda: one_task("heavy"), 1) for _ in range(50)]
    local = [timed(lambda: one_task("default"), 1) for _ in range(50)]

    print(f"{args.tasks} mapped tasks on {args.workers} workers (medians of {args.repeat} alternating pairs)")
    print(f"  ProcessPoolExecutor.map   {pooled:8.3f} s")
    print(f"  weave on 'process'        {woven:8.3f} s")
    print(f"  ratio of each pair        {statistics.median(ratios):.2f}x (from {ratios[0]:.2f}x to {ratios[-1]:.2f}x)")
    if tcp_ratios:
        print(f"  workers calling over TCP  {statistics.median(tcp_ratios):.2f}x (the same pairs' pool times)")
    if single_ratios:
        single = statistics.median(single_ratios)
        print(f"  one run per worker        {single:.2f}x (prefetch 1, the same pairs' pool times)")
    if bare is not None:
        print(f"  bare pipeline             {statistics.median(bare_ratios):.2f}x (the same pairs' pool times)")
    print()
    print(f"CPU per task, in microseconds (the task itself: {own:.0f}; runtime loop: {runtime_loop_kind()})")
    for title, spent in runners:
        parts = ", ".join(f"{name} {us:.0f}" for name, us in sorted(spent.items(), key=lambda kv: -kv[1]))
        print(f"  {title:<20} total {sum(spent.values()):5.0f}: {parts}")
    print()
    print("a weave with one trivial remote task")
    later_ms, local_ms = statistics.median(later) * 1000, statistics.median(local) * 1000
    print(f"  first weave (starts the environment)   {first * 1000:8.1f} ms")
    print(f"  later weaves, median of 50             {later_ms:8.2f} ms")
    print(f"  same weave with a local task, median   {local_ms:8.2f} ms")
    print(f"  a later weave's remote task adds {later_ms - local_ms:.2f} ms over the local one (its round trip")
    print(f"  to a worker included); the first weave paid {first * 1000 - later_ms:.1f} ms more to start the pool")
    wove.shutdown()


if __name__ == "__main__":
    main()
