"""Dask: a trivial function as a native Dask task and as a wove remote task, side by side on one local cluster.

Native: ``client.submit(echo, i).result()`` one after the other, then ``client.gather(client.map(echo, range(500)))``.
Wove: a weave with one remote task (the result comes back over the callback server), one after the other, then one
weave mapping 500 items. Both run on the same ``LocalCluster`` (two worker processes, one thread each).

Native and wove measurements alternate ``--repeat`` times (medians reported): the machines are shared and noisy.

Run: python -m benchmarks.backends.bench_dask [--sequential 200] [--concurrent 500] [--repeat 3]
"""

from __future__ import annotations

import importlib
import tempfile
from typing import Any

from benchmarks.backends._side_by_side import ROOT, Row, command_line, compare, measure, measure_wove, print_table


def echo(value: int) -> int:
    """The function both sides run."""
    return value


def run(sequential: int = 200, concurrent: int = 500, repeat: int = 3) -> list[dict[str, Any]]:
    """One row: native Dask against wove on Dask, on a ``LocalCluster`` started (and stopped) here."""
    from distributed import Client, LocalCluster

    # The function by its importable name, as a user's module function would be (also when run as a script).
    func = importlib.import_module("benchmarks.backends.bench_dask").echo
    with tempfile.TemporaryDirectory(prefix="wove-bench-dask-") as tmp:
        cluster = LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            local_directory=tmp,
            env={"PYTHONPATH": str(ROOT)},
        )
        client = Client(cluster.scheduler_address, set_as_default=False)
        environment = {"executor": "dask", "executor_config": {"address": cluster.scheduler_address}}

        def native(sequential: int, concurrent: int) -> Row:
            def one(value: int) -> Any:
                return client.submit(func, value, pure=False).result()

            def many(count: int) -> list[Any]:
                values: list[Any] = client.gather(client.map(func, range(count), pure=False))
                return values

            return measure(one, many, sequential, concurrent)

        def woven(sequential: int, concurrent: int) -> Row:
            return measure_wove(environment, func, sequential, concurrent)

        try:
            return [compare("dask", native, woven, sequential, concurrent, repeat)]
        finally:
            client.close()
            cluster.close()


if __name__ == "__main__":
    parser = command_line(__doc__ or "")
    parser.add_argument("--repeat", type=int, default=3, help="alternate native and wove this many times (medians)")
    options = parser.parse_args()
    rows = run(options.sequential, options.concurrent, options.repeat)
    print_table(rows, f"{options.sequential} sequential, {options.concurrent} at once, median of {options.repeat}")
