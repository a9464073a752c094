"""Slurm: a trivial Python job submitted natively and as a wove remote task, on a single-node cluster started here.

Native, two ways: ``sbatch --wait --wrap 'python -c "print(i)"'`` (Slurm's own submit-and-wait; it checks the job's
state every couple of seconds), and ``sbatch --parsable`` followed by ``squeue`` every 20 ms (the fastest a script can
learn that a job ended). Each reads the value back from the job's output file. Wove: a weave with one remote task on
the ``slurm`` executor (the value comes back over the callback server). Then ``concurrent`` jobs at once each way:
that many waiting ``sbatch --wait`` commands, and one weave mapping the task over that many items.

The cluster comes from ``scripts/slurm-cluster`` in a temporary directory (root and Debian's slurm-wlm and munge are
needed) and is stopped at the end. Native and wove measurements alternate ``--repeat`` times (medians reported).

Run: python -m benchmarks.backends.bench_slurm [--sequential 10] [--concurrent 20] [--repeat 1]
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.backends._side_by_side import Row, compare, print_table

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "slurm-cluster"
#: Calls before timing starts (the first job after the environment starts also pays for starting it).
WARMUP = 2


def echo(value: int) -> int:
    """The function wove's job runs."""
    return value


@contextmanager
def cluster() -> Iterator[Path]:
    """A single-node cluster for the benchmark; yields the directory jobs write their output to."""
    if os.geteuid() != 0 or shutil.which("slurmctld") is None:
        raise RuntimeError("needs root and Slurm: apt-get install -y --no-install-recommends slurm-wlm munge")
    directory = Path(tempfile.mkdtemp(prefix="wove-bench-slurm-"))  # munged needs a world-searchable path
    previous = os.environ.get("SLURM_CONF")
    try:
        subprocess.run([str(SCRIPT), "start", str(directory)], check=True, capture_output=True, timeout=120)
        os.environ["SLURM_CONF"] = str(directory / "slurm.conf")
        (directory / "out").mkdir()
        yield directory / "out"
    finally:
        subprocess.run([str(SCRIPT), "stop", str(directory)], check=False, capture_output=True, timeout=120)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        shutil.rmtree(directory, ignore_errors=True)


def measure(one: Callable[[int], Any], many: Callable[[int], list[Any]], sequential: int, concurrent: int) -> Row:
    """Median of ``sequential`` calls of ``one`` after ``WARMUP``, then the throughput of ``many(concurrent)``."""
    for i in range(WARMUP):
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


def native_job(output: Path, value: int, *, wait: bool) -> int:
    """Submit ``python -c 'print(value)'``; wait with ``sbatch --wait`` or by polling ``squeue``; read the value."""
    path = output / f"native-{time.monotonic_ns()}-{value}.out"
    wrap = f"{sys.executable} -c 'print({value})'"
    command = ["sbatch", "--parsable", f"--output={path}", "--wrap", wrap]
    if wait:
        subprocess.run([*command[:1], "--wait", *command[1:]], check=True, capture_output=True)
    else:
        job_id = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()
        while True:
            squeue = ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"]
            state = subprocess.run(squeue, capture_output=True, text=True).stdout.strip()
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                break
            time.sleep(0.02)
    return int(path.read_text())


def run(sequential: int = 10, concurrent: int = 20, repeat: int = 1) -> list[dict[str, Any]]:
    """Two rows: wove on Slurm against ``sbatch --wait``, and against ``sbatch`` plus a 20 ms ``squeue`` poll."""
    import wove
    from wove import weave

    func = importlib.import_module("benchmarks.backends.bench_slurm").echo  # by its importable name, like user code
    with cluster() as output:
        environment = {
            "executor": "slurm",
            "executor_config": {"output_dir": str(output), "env": {"PYTHONPATH": str(ROOT)}},
        }

        def native(wait: bool) -> Callable[[int, int], Row]:
            def measured(sequential: int, concurrent: int) -> Row:
                def many(count: int) -> list[Any]:
                    with ThreadPoolExecutor(count) as pool:
                        return list(pool.map(lambda i: native_job(output, i, wait=wait), range(count)))

                return measure(lambda i: native_job(output, i, wait=wait), many, sequential, concurrent)

            return measured

        def woven(sequential: int, concurrent: int) -> Row:
            wove.config(progress=False, environments={"default": {}, "jobs": environment})

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

        return [
            compare("slurm-wait", native(True), woven, sequential, concurrent, repeat),
            compare("slurm-poll", native(False), woven, sequential, concurrent, repeat),
        ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=10)
    parser.add_argument("--concurrent", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=1, help="alternate native and wove this many times (medians)")
    options = parser.parse_args()
    rows = run(options.sequential, options.concurrent, options.repeat)
    print_table(rows, f"{options.sequential} sequential, {options.concurrent} at once, median of {options.repeat}")
