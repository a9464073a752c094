"""Every engine's side-by-side benchmark in one table: ``python -m benchmarks.backends``.

Each engine runs in its own subprocess (ARQ in ``.venv-arq``, which it needs): ``benchmarks.backends.bench_<engine>``
starts its own engine on loopback and measures the same trivial function as a native call and as a wove remote
task: median latency over sequential calls and throughput of concurrent ones. An engine whose module or SDK is not
installed here is listed as not available. Options: ``--sequential 200 --concurrent 500`` and ``--only celery,ray``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.backends._side_by_side import HEADER, ROOT, format_row

ENGINES = ("celery", "rq", "arq", "taskiq", "dask", "ray", "slurm", "temporal", "aws_batch", "kubernetes_jobs")
#: Engines whose SDK cannot share the main environment, and the interpreter of the environment that has it.
PYTHONS = {"arq": ROOT / ".venv-arq" / "bin" / "python"}
MARK, MISSING = "WOVE-BENCH-ROWS=", "WOVE-BENCH-MISSING="
#: Runs in the engine's subprocess: its rows as JSON, or what is missing for it.
CODE = """
import importlib, json
try:
    rows = importlib.import_module("benchmarks.backends.bench_{name}").run({sequential}, {concurrent})
except ModuleNotFoundError as exc:
    print({missing!r} + str(exc))
else:
    print({mark!r} + json.dumps(rows))
"""


class NotAvailable(Exception):
    """The engine's benchmark module, its SDK or its Python environment is not installed here."""


def run_engine(name: str, sequential: int, concurrent: int) -> list[dict[str, object]]:
    python = PYTHONS.get(name, Path(sys.executable))
    if not python.exists():
        raise NotAvailable(f"{python.relative_to(ROOT)} is missing (scripts/test creates it)")
    code = CODE.format(name=name, missing=MISSING, mark=MARK, sequential=sequential, concurrent=concurrent)
    done = subprocess.run([str(python), "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(MISSING):
            raise NotAvailable(line[len(MISSING) :])
        if line.startswith(MARK):
            rows: list[dict[str, object]] = json.loads(line[len(MARK) :])
            return rows
    tail = "\n".join((done.stderr or done.stdout).splitlines()[-15:])
    raise RuntimeError(f"{name} benchmark failed (exit {done.returncode}):\n{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=500)
    parser.add_argument("--only", default=",".join(ENGINES), help=f"comma-separated, of: {', '.join(ENGINES)}")
    args = parser.parse_args()
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(names) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    print(HEADER)
    print("-" * len(HEADER))
    for name in names:
        try:
            rows = run_engine(name, args.sequential, args.concurrent)
        except NotAvailable as exc:
            print(f"{name:<28} not available: {exc}", flush=True)
            continue
        except RuntimeError as exc:
            print(f"{name:<28} failed: {exc}", flush=True)
            continue
        for row in rows:
            print(format_row(row), flush=True)


if __name__ == "__main__":
    main()
