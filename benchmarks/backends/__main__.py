"""Every engine's side-by-side benchmark in one table: ``python -m benchmarks.backends``.

Each engine runs in its own subprocess (ARQ in ``.venv-arq``, which it needs), starts its own engine on
loopback, and measures the same trivial function as a native call and as a wove remote task: median latency
over sequential calls and throughput of concurrent ones. Options: ``--sequential 200 --concurrent 500``
and ``--only celery,ray``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ("celery", "rq", "arq", "taskiq", "dask", "ray")
MARK = "WOVE-BENCH-ROWS="


def run_engine(name: str, sequential: int, concurrent: int) -> list[dict[str, object]]:
    python = ROOT / ".venv-arq" / "bin" / "python" if name == "arq" else Path(sys.executable)
    code = (
        "import json, importlib; "
        f"rows = importlib.import_module('benchmarks.backends.{name}').run({sequential}, {concurrent}); "
        f"print({MARK!r} + json.dumps(rows))"
    )
    done = subprocess.run([str(python), "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            rows: list[dict[str, object]] = json.loads(line[len(MARK) :])
            return rows
    tail = "\n".join((done.stderr or done.stdout).splitlines()[-15:])
    raise RuntimeError(f"{name} benchmark failed (exit {done.returncode}):\n{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=500)
    parser.add_argument("--only", default=",".join(ENGINES))
    args = parser.parse_args()
    header = (
        f"{'engine':<24} {'native ms':>10} {'wove ms':>9} {'added ms':>9} "
        f"{'native/s':>9} {'wove/s':>8} {'wove/native':>12}"
    )
    print(header)
    print("-" * len(header))
    for name in args.only.split(","):
        try:
            rows = run_engine(name, args.sequential, args.concurrent)
        except RuntimeError as exc:
            print(f"{name:<24} failed: {exc}")
            continue
        for row in rows:
            native, wove = float(row["native_median_ms"]), float(row["wove_median_ms"])  # type: ignore[arg-type]
            n_tp, w_tp = float(row["native_throughput"]), float(row["wove_throughput"])  # type: ignore[arg-type]
            print(
                f"{row['engine']!s:<24} {native:>10.2f} {wove:>9.2f} {wove - native:>9.2f} "
                f"{n_tp:>9.0f} {w_tp:>8.0f} {w_tp / n_tp:>12.2f}"
            )


if __name__ == "__main__":
    main()
