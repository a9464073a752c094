"""The README's demo: a weave whose heavy steps leave the process through the embedded ``process`` backend.

Run it with ``python -m wove demo``. Nothing to install beyond ``wove[dispatch]``: the ``process`` backend
runs payloads in local worker processes through the same worker entrypoint and callback path as Celery,
Slurm or Ray would.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import wove
from wove import weave


def configure(workers: int = 2) -> None:
    """Two environments: tasks run here by default; ``heavy`` ones go to local worker processes."""
    wove.config(
        default_environment="default",
        environments={
            "default": {"executor": "local"},
            "heavy": {"executor": "process", "executor_config": {"workers": workers}, "retries": 2},
        },
    )


def run(items: int = 36, flaky_marker: Path | None = None) -> wove.Weave:
    """Price a catalog in worker processes, fetch exchange rates with one failed attempt, and summarize."""
    marker = flaky_marker or Path(tempfile.mkdtemp(prefix="wove-demo-")) / "fx-attempted"

    with weave(items=items, marker=str(marker)) as w:

        @w.do
        def catalog(items: int) -> list[dict[str, Any]]:
            return [{"sku": f"SKU-{i:03d}", "base": 10.0 + i} for i in range(items)]

        @w.do("catalog", environment="heavy")
        def priced(product: dict[str, Any]) -> dict[str, Any]:
            digest = product["sku"].encode()
            for _ in range(20_000):  # stand-in for real CPU work
                digest = hashlib.sha256(digest).digest()
            return {**product, "price": round(product["base"] * 1.2 + digest[0] / 100, 2), "pid": os.getpid()}

        @w.do(environment="heavy")
        def fx_rates(marker: str) -> dict[str, float]:
            if not os.path.exists(marker):  # the first attempt fails, the retry succeeds
                Path(marker).touch()
                raise ConnectionError("rates service timed out (the retry will succeed)")
            return {"EUR": 0.92, "GBP": 0.79}

        @w.do
        def summary(priced: list[dict[str, Any]], fx_rates: dict[str, float]) -> dict[str, Any]:
            total = sum(p["price"] for p in priced)
            return {
                "products": len(priced),
                "total_usd": round(total, 2),
                "total_eur": round(total * fx_rates["EUR"], 2),
                "worker_pids": sorted({p["pid"] for p in priced}),
            }

    return w


def main() -> int:
    """Run the demo and print its results and timeline."""
    configure()
    started = time.perf_counter()
    w = run()
    elapsed = time.perf_counter() - started
    summary = w.result.summary
    print(f"priced {summary['products']} products in worker processes {summary['worker_pids']}")
    print(f"total: {summary['total_usd']} USD = {summary['total_eur']} EUR")
    attempts = w.result.records["fx_rates"]
    print(f"fx_rates took {len(attempts)} attempts: " + ", ".join(r.status for r in attempts))
    print(f"weave finished in {elapsed:.2f}s (this process is pid {os.getpid()})")
    print()
    print(w.result.timeline())
    wove.shutdown()
    return 0
