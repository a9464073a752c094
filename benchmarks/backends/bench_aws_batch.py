"""AWS Batch, emulated: a trivial job submitted with boto3 and polled, against the same job as a wove remote task.

Both sides run against the emulated AWS Batch of the test suite (moto's API with a local job runner, see
``tests/services/aws_batch_emulator.py``): every job is a real local process, started by the runner.

Native: SubmitJob with the command ``python -c "pass"``, then DescribeJobs every ``POLL`` seconds until the job is
SUCCEEDED (AWS Batch has no way to wait for a job, nor to return a value). Wove: a weave with one remote task returning
its argument; the job runs ``python -m wove.backend_worker`` and the value comes back over the callback server. Calls
alternate native and wove, so a burst of load on the shared machine lands on both; then ``concurrent`` at once each
way (that many jobs submitted and awaited; one weave mapping that many items).

Run: python -m benchmarks.backends.bench_aws_batch [--sequential 20] [--concurrent 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Seconds between DescribeJobs calls of the native side: as eager as a client would reasonably be.
POLL = 0.02
WARMUP = 2


def echo(value: int) -> int:
    """The task wove runs."""
    return value


def run(sequential: int = 20, concurrent: int = 10) -> list[dict[str, Any]]:
    """One row: boto3 submit-and-poll against wove, on an emulator started (and stopped) here."""
    import wove
    from tests.services.aws_batch import CREDENTIALS, BatchEmulator, BatchSetup
    from wove import weave

    os.environ.update(CREDENTIALS)
    with tempfile.TemporaryDirectory(prefix="wove-bench-aws-batch-") as tmp:
        emulator = BatchEmulator(Path(tmp)).start()
        try:
            setup = BatchSetup(emulator)
            batch = emulator.client()
            wove.config(
                progress=False,
                environments={"default": {}, "jobs": {"executor": "aws_batch", "executor_config": setup.config()}},
            )
            overrides = {"command": ["python", "-c", "pass"]}

            def submit() -> str:
                name = f"native-{uuid.uuid4().hex}"
                job = batch.submit_job(
                    jobName=name,
                    jobQueue=setup.job_queue,
                    jobDefinition=setup.job_definition,
                    containerOverrides=overrides,
                )
                return str(job["jobId"])

            def wait(job_ids: list[str]) -> None:
                pending = set(job_ids)
                while pending:
                    for job in batch.describe_jobs(jobs=sorted(pending))["jobs"]:
                        if job["status"] == "SUCCEEDED":
                            pending.discard(job["jobId"])
                        elif job["status"] == "FAILED":
                            raise RuntimeError(f"native job failed: {job.get('statusReason')}")
                    if pending:
                        time.sleep(POLL)

            def native_one(value: int) -> int:
                wait([submit()])
                return value

            def native_many(count: int) -> list[int]:
                wait([submit() for _ in range(count)])
                return list(range(count))

            def wove_one(value: int) -> int:
                with weave(value=value) as w:
                    w.do(environment="jobs")(echo)
                result: int = w.result.final
                return result

            def wove_many(count: int) -> list[int]:
                with weave() as w:
                    w.do(range(count), environment="jobs")(echo)
                values: list[int] = w.result.final
                return values

            for i in range(WARMUP):
                assert native_one(i) == i and wove_one(i) == i
            native_ms, wove_ms = [], []
            for i in range(sequential):
                native_ms.append(_timed(native_one, i))
                wove_ms.append(_timed(wove_one, i))
            native_rate = concurrent / (_timed(native_many, concurrent) / 1e3)
            wove_rate = concurrent / (_timed(wove_many, concurrent) / 1e3)
            return [
                {
                    "engine": "aws_batch (emulated)",
                    "native_median_ms": round(statistics.median(native_ms), 3),
                    "wove_median_ms": round(statistics.median(wove_ms), 3),
                    "native_throughput": round(native_rate, 1),
                    "wove_throughput": round(wove_rate, 1),
                }
            ]
        finally:
            wove.shutdown()
            emulator.stop()


def _timed(call: Callable[[int], Any], value: int) -> float:
    began = time.perf_counter()
    result = call(value)
    elapsed = (time.perf_counter() - began) * 1e3
    assert result == value or result == list(range(value)), result
    return elapsed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=10)
    options = parser.parse_args()
    (row,) = run(options.sequential, options.concurrent)
    native, woven = row["native_median_ms"], row["wove_median_ms"]
    print(f"{'engine':<22} {'native ms':>10} {'wove ms':>10} {'added ms':>9} {'native/s':>9} {'wove/s':>8}")
    print(
        f"{row['engine']:<22} {native:>10.1f} {woven:>10.1f} {woven - native:>9.1f} "
        f"{row['native_throughput']:>9.1f} {row['wove_throughput']:>8.1f}"
    )
    print(
        f"On the emulated AWS Batch (moto + a local job runner; every job a local process): median of "
        f"{options.sequential} sequential jobs, then {options.concurrent} at once. On AWS, scheduling and container "
        "start take seconds per job."
    )
