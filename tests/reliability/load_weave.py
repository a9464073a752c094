"""A weave mapping one remote task over many items, run as its own process so its memory can be measured.

``python -m tests.reliability.load_weave '<json settings>'`` prints one JSON line: how many items resolved, with which
values, how long the weave took, the largest number of runs ever in flight at once (sampled), and the process's
resident memory before the weave and at its peak. Settings: ``executor`` (``"process"`` or ``"celery"``),
``executor_config``, ``items``, ``max_in_flight``, ``folder`` (where tasks note each execution), ``rounds`` (weaves run
one after another; memory is reported after each).
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from typing import Any

import psutil  # type: ignore[import-untyped]

import wove
from tests.reliability.tasks import add, double
from wove import weave
from wove.environment import get_runtime


def rss_mib() -> float:
    return float(psutil.Process().memory_info().rss) / (1 << 20)


def peak_rss_mib() -> float:
    """The peak resident memory of this process's address space (``VmHWM``).

    Not ``getrusage``'s ``ru_maxrss``: Linux carries the peak of the process that spawned this one over ``exec``, so it
    would report the test runner's memory instead of the weave's.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


class InFlightSampler:
    """Samples, every few milliseconds, how many runs the runtime has submitted and not yet resolved."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> InFlightSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        runs = get_runtime()._runs
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, len(runs))


def main(settings: dict[str, Any]) -> dict[str, Any]:
    environment = {
        "executor": settings["executor"],
        "executor_config": settings.get("executor_config", {}),
        "delivery_max_in_flight": settings["max_in_flight"],
    }
    wove.config(environments={"default": {"executor": "local"}, "jobs": environment})
    with weave() as w:  # start the environment and warm the workers: not part of what is measured

        @w.do(range(4), environment="jobs")
        def warm(item: int) -> int:
            return add(item, 1)

    count, folder = int(settings["items"]), str(settings["folder"])
    report: dict[str, Any] = {"items": count, "baseline_rss_mib": round(rss_mib(), 1), "rounds": []}
    for _ in range(int(settings.get("rounds", 1))):
        began = time.perf_counter()
        with InFlightSampler() as sampler, weave(items=range(count), folder=folder) as w:
            w.do("items", environment="jobs")(double)
        seconds = time.perf_counter() - began
        values = w.result.double
        records = w.result.records["double"]
        report["rounds"].append(
            {
                "seconds": round(seconds, 2),
                "resolved": len(values),
                "correct": sum(1 for item, value in enumerate(values) if value == 2 * item),
                "succeeded_records": sum(1 for record in records if record.status == "succeeded"),
                "records": len(records),
                "peak_in_flight": sampler.peak,
                "rss_after_mib": round(rss_mib(), 1),
            }
        )
        del w, values, records
    # the kernel's per-CPU counters make two reads differ by a few pages: the peak is at least any sample
    report["peak_rss_mib"] = round(max([peak_rss_mib()] + [one["rss_after_mib"] for one in report["rounds"]]), 1)
    return report


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
