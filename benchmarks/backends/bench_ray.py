"""Ray: a trivial function as a native Ray task and as a wove remote task, side by side on one local Ray.

Native: ``ray.get(echo.remote(i))`` one after the other, then ``ray.get([echo.remote(i) for i in range(500)])``.
Wove: a weave with one remote task (the result comes back over the callback server, nothing calls ``ray.get``), one
after the other, then one weave mapping 500 items. Both run on the same local Ray (``num_cpus=2``), started here.

Native and wove measurements alternate ``--repeat`` times (medians reported): the machines are shared and noisy.

Run: python -m benchmarks.backends.bench_ray [--sequential 200] [--concurrent 500] [--repeat 3]
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from typing import Any

from benchmarks.backends._side_by_side import ROOT, Row, command_line, compare, measure, measure_wove, print_table

#: Ray's processes inherit these: no token file under the home directory, and this module importable by workers.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}


def echo(value: int) -> int:
    """The function both sides run."""
    return value


def run(sequential: int = 200, concurrent: int = 500, repeat: int = 3) -> list[dict[str, Any]]:
    """One row: native Ray against wove on Ray, on a local Ray started (and stopped) here."""
    import ray

    # The function by its importable name, as a user's module function would be (also when run as a script).
    func = importlib.import_module("benchmarks.backends.bench_ray").echo
    remote_echo = ray.remote(func)
    temp = tempfile.mkdtemp(prefix="wove-ray-")  # short: Ray's socket paths must fit in 107 bytes
    saved = {key: os.environ.get(key) for key in RAY_ENV}
    os.environ.update(RAY_ENV)
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, configure_logging=False)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def native(sequential: int, concurrent: int) -> Row:
        def one(value: int) -> Any:
            return ray.get(remote_echo.remote(value))

        def many(count: int) -> list[Any]:
            values: list[Any] = ray.get([remote_echo.remote(i) for i in range(count)])
            return values

        return measure(one, many, sequential, concurrent)

    def woven(sequential: int, concurrent: int) -> Row:
        return measure_wove({"executor": "ray"}, func, sequential, concurrent)  # attaches to the Ray started above

    try:
        return [compare("ray", native, woven, sequential, concurrent, repeat)]
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    parser = command_line(__doc__ or "")
    parser.add_argument("--repeat", type=int, default=3, help="alternate native and wove this many times (medians)")
    options = parser.parse_args()
    rows = run(options.sequential, options.concurrent, options.repeat)
    print_table(rows, f"{options.sequential} sequential, {options.concurrent} at once, median of {options.repeat}")
