"""The ``aws_batch`` backend against an emulated AWS Batch: moto's API server with a local job runner.

wove talks to the emulator with the official boto3 client over HTTP, as it would to AWS. The emulator's runner
executes every submitted job's command (``python -m wove.backend_worker`` with the payload in its environment) as a
real local process, so the payload really runs and posts back, and job states come from real exit statuses (see
``tests/services/aws_batch_emulator.py``). The tests check jobs the way an operator would, with DescribeJobs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import wove
from tests.integration.queue_support import ROOT, Driver, await_for, gone, read_pid, wait_for
from tests.services.aws_batch import REGION, BatchSetup
from tests.services.base import free_port
from wove import weave
from wove.backend.codec import payload_from_b64
from wove.errors import BackendUnavailableError, ConfigError, DeliveryLostError, RunCancelledError, SubmitError
from wove.integrations import get_adapter_class
from wove.integrations.aws_batch import MAX_OVERRIDES_CHARS, PAYLOAD_ENV, AwsBatchAdapter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


class InventoryError(Exception):
    """Raised in a job; arrives as itself because this module is importable there."""


def nap(seconds: float, pid_file: str) -> str:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)
    return "rested"


def configure(setup: BatchSetup, *, settings: dict[str, Any] | None = None, **extra: Any) -> None:
    environment = {"executor": "aws_batch", "executor_config": setup.config(**extra), **(settings or {})}
    wove.config(environments={"default": {}, "jobs": environment})


def overrides_of(job: dict[str, Any]) -> dict[str, str]:
    """The environment AWS Batch reports for a job, by name."""
    return {item["name"]: item["value"] for item in job["container"]["environment"]}


# -- the weave ---------------------------------------------------------------------------------------------------------


def test_registered_under_its_name() -> None:
    assert get_adapter_class("aws_batch") is AwsBatchAdapter
    assert "wove[aws_batch]" in AwsBatchAdapter.install_hint


def test_local_remote_and_mapped_tasks_run_as_jobs(aws_batch: BatchSetup) -> None:
    configure(aws_batch)
    with weave(n=5) as w:

        @w.do
        def items(n: int) -> list[int]:
            return list(range(n))

        @w.do("items", environment="jobs")
        def squared(item: int) -> tuple[int, int, str]:
            return item * item, os.getpid(), os.environ["AWS_BATCH_JOB_ID"]

        @w.do(environment="jobs")
        def total(items: list[int]) -> int:
            return sum(items)

        @w.do
        def summary(squared: list[tuple[int, int, str]], total: int) -> tuple[int, int]:
            return sum(value for value, _, _ in squared), total

    assert w.result.summary == (30, 10)
    pids = {pid for _, pid, _ in w.result.squared}
    assert len(pids) == 5 and os.getpid() not in pids  # one process (the container's stand-in) per job
    records = w.result.records["squared"]
    assert [str(r.submission) for r in records] == [job_id for _, _, job_id in w.result.squared]
    batch = aws_batch.emulator.client()

    def describe() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = batch.describe_jobs(jobs=[str(r.submission) for r in records])["jobs"]
        return found

    # The value arrives by callback before the job's process exits, so a job may still be RUNNING for a moment.
    wait_for(lambda: {job["status"] for job in describe()} == {"SUCCEEDED"}, 30, "every job to end SUCCEEDED")
    jobs = describe()
    for record in records:
        (job,) = [job for job in jobs if job["jobId"] == str(record.submission)]
        assert job["jobName"] == f"wove-squared-{record.run_id}"
        assert job["container"]["command"] == ["python", "-m", "wove.backend_worker"]
        assert job["jobQueue"].endswith(f"job-queue/{aws_batch.job_queue}")


def test_a_remote_exception_keeps_its_type(aws_batch: BatchSetup) -> None:
    configure(aws_batch)
    with pytest.raises(InventoryError, match="out of stock"), weave() as w:

        @w.do(environment="jobs")
        def reserve() -> None:
            raise InventoryError("out of stock")

    (record,) = w.result.records["reserve"]
    job = aws_batch.emulator.wait_for_status(str(record.submission), "SUCCEEDED", "FAILED")
    # The worker exits 1 after posting the task's error; the adapter's later FAILED report lost the race, as it must.
    assert job["status"] == "FAILED" and job["attempts"][-1]["container"]["exitCode"] == 1


async def test_cancelling_the_weave_terminates_the_job(aws_batch: BatchSetup, tmp_path: Path) -> None:
    configure(aws_batch)
    pid_file = tmp_path / "pid"
    holder: dict[str, Any] = {}

    async def run() -> None:
        async with weave(pid_file=str(pid_file)) as w:
            holder["w"] = w

            @w.do(environment="jobs")
            def sleeper(pid_file: str) -> str:
                return nap(60, pid_file)

    task = asyncio.ensure_future(run())
    await await_for(lambda: read_pid(pid_file) is not None, 30, "the job's process started")
    pid = read_pid(pid_file)
    assert pid is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (record,) = holder["w"].result.records["sleeper"]
    assert record.status == "cancelled"
    job_id = str(record.submission)
    job = await asyncio.to_thread(aws_batch.emulator.wait_for_status, job_id, "SUCCEEDED", "FAILED")
    assert job["status"] == "FAILED"
    assert job["statusReason"] == f"cancelled by wove (run {record.run_id})"
    await await_for(lambda: len(aws_batch.emulator.records(job_id)) == 2, 10, "the runner recorded the end")
    ended = aws_batch.emulator.records(job_id)[-1]
    assert ended["signal"] == "SIGTERM" and ended["exitCode"] == 143  # stopped as ECS stops a task
    assert gone(pid)


async def test_a_job_terminated_by_an_operator_cancels_the_run(aws_batch: BatchSetup, tmp_path: Path) -> None:
    configure(aws_batch)
    pid_file = tmp_path / "pid"
    batch = aws_batch.emulator.client()

    async def operator() -> None:
        await await_for(lambda: read_pid(pid_file) is not None, 30, "the job's process started")
        running = await asyncio.to_thread(batch.list_jobs, jobQueue=aws_batch.job_queue, jobStatus="RUNNING")
        (job,) = [job for job in running["jobSummaryList"] if job["jobName"].startswith("wove-stopped_by_operator-")]
        await asyncio.to_thread(batch.terminate_job, jobId=job["jobId"], reason="operator says stop")

    stopping = asyncio.ensure_future(operator())
    with pytest.raises(RunCancelledError, match="the backend cancelled run"):
        async with weave(pid_file=str(pid_file)) as w:

            @w.do(environment="jobs")
            def stopped_by_operator(pid_file: str) -> str:
                return nap(60, pid_file)

    await stopping
    (record,) = w.result.records["stopped_by_operator"]
    job = await asyncio.to_thread(aws_batch.emulator.wait_for_status, str(record.submission), "FAILED")
    assert job["statusReason"] == "operator says stop"  # the worker got SIGTERM and reported the cancel


HEADLINE = "FAILED before wove's worker reported an outcome: status reason: "


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("image that cannot be pulled", [HEADLINE + "Task failed to start", "container: CannotPullContainerError"]),
        ("command that cannot start", [HEADLINE + "Task failed to start", "CannotStartContainerError: exec: 'no-pyth"]),
        ("image without wove", [HEADLINE, "exit code 1; log stream ", "\n--- last lines", "No module named 'wove'"]),
    ],
)
def test_a_job_that_fails_before_the_worker_starts_ends_the_run(
    aws_batch: BatchSetup, case: str, expected: list[str]
) -> None:
    extra: dict[str, Any] = {}
    if case == "image that cannot be pulled":
        extra["job_definition"] = aws_batch.emulator.register(
            f"missing-image-{os.getpid()}", image="registry.invalid/x:1"
        )
    elif case == "command that cannot start":
        extra["python"] = "no-python-here"
    else:  # isolated mode without site-packages: the interpreter of an image that lacks wove
        extra["python"] = ["python", "-I", "-S"]
    # A hang would show: only the adapter's report of the failed job can end this run before the test times out.
    configure(aws_batch, settings={"delivery_timeout": 3600}, **extra)
    with pytest.raises(DeliveryLostError) as info, weave() as w:

        @w.do(environment="jobs")
        def never() -> int:
            return 1

    assert all(fragment in str(info.value) for fragment in expected), str(info.value)
    (record,) = w.result.records["never"]
    assert record.status == "failed"
    job = aws_batch.emulator.describe(str(record.submission))
    assert job["status"] == "FAILED"


def test_a_job_that_succeeds_without_an_outcome_is_an_error(aws_batch: BatchSetup) -> None:
    # ``python -c pass -m wove.backend_worker`` exits 0 without running the worker, like a wrapper that swallowed it.
    configure(aws_batch, settings={"delivery_timeout": 3600}, python=["python", "-c", "pass"], finish_grace=0.5)
    expected = (
        r"SUCCEEDED but wove's worker reported no outcome: status reason: Essential container in task exited; exit"
    )
    with pytest.raises(DeliveryLostError, match=expected), weave() as w:

        @w.do(environment="jobs")
        def never() -> int:
            return 1


def test_an_oversized_argument_goes_by_reference(aws_batch: BatchSetup) -> None:
    configure(aws_batch)
    blob = os.urandom(1 << 20)
    with weave(blob=blob) as w:

        @w.do(environment="jobs")
        def measured(blob: bytes) -> tuple[int, bytes]:
            return len(blob), blob[-16:]

    assert w.result.measured == (len(blob), blob[-16:])
    (record,) = w.result.records["measured"]
    job = aws_batch.emulator.describe(str(record.submission))
    text = overrides_of(job)[PAYLOAD_ENV]
    assert set(payload_from_b64(text)["args_pickle"]) == {"ref", "size"}  # the megabyte stayed on the callback server
    overrides = {"command": job["container"]["command"], "environment": [{"name": PAYLOAD_ENV, "value": text}]}
    assert len(text) < 2048 and len(json.dumps(overrides)) < MAX_OVERRIDES_CHARS


def test_options_and_overrides_reach_the_job(aws_batch: BatchSetup) -> None:
    configure(
        aws_batch,
        job_name_prefix="nightly_",
        container_overrides={"environment": {"GREETING": "hello"}},
        submit_options={"tags": {"team": "data"}, "parameters": {"day": "monday"}},
    )
    with weave() as w:

        @w.do(environment="jobs")
        def greet() -> str:
            return os.environ["GREETING"]

    assert w.result.greet == "hello"
    (record,) = w.result.records["greet"]
    job = aws_batch.emulator.describe(str(record.submission))
    assert job["jobName"] == f"nightly_greet-{record.run_id}"
    assert job["tags"] == {"team": "data"} and job["parameters"] == {"day": "monday"}


async def test_an_existing_client_is_used(aws_batch: BatchSetup) -> None:
    client = aws_batch.emulator.client()
    config = {"client": client, "job_queue": aws_batch.job_queue, "job_definition": aws_batch.job_definition}
    driver = await Driver.start(AwsBatchAdapter, "aws_batch", config)
    try:
        adapter = driver.executor.adapter
        assert isinstance(adapter, AwsBatchAdapter) and adapter.client is client
        run_id = await driver.submit(nap, seconds=0, pid_file=os.devnull)
        assert (await driver.outcome(run_id))["result"] == "rested"
        submission = driver.frames[run_id][-1]["submission"]
        assert client.describe_jobs(jobs=[submission])["jobs"][0]["jobId"] == submission
    finally:
        await driver.close()
    assert client.describe_job_queues()["jobQueues"]  # wove left the given client open


def test_an_unknown_job_queue_fails_when_the_environment_starts(aws_batch: BatchSetup) -> None:
    configure(aws_batch, job_queue="no-such-queue")
    with pytest.raises(ConfigError, match=r"no job queue 'no-such-queue' in region us-east-1"), weave() as w:

        @w.do(environment="jobs")
        def never() -> int:
            return 1


def test_an_unreachable_endpoint_fails_when_the_environment_starts(aws_batch: BatchSetup) -> None:
    from botocore.config import Config

    endpoint = f"http://127.0.0.1:{free_port()}"
    options = {"config": Config(retries={"max_attempts": 1}, connect_timeout=2)}
    configure(aws_batch, endpoint_url=endpoint, client_options=options)
    refused = r"cannot reach AWS Batch: EndpointConnectionError: .*127\.0\.0\.1"
    with pytest.raises(BackendUnavailableError, match=refused), weave() as w:

        @w.do(environment="jobs")
        def never() -> int:
            return 1


def test_a_refused_submission_names_the_reason(aws_batch: BatchSetup) -> None:
    configure(aws_batch, job_definition="no-such-definition")
    with pytest.raises(SubmitError, match=r"SubmitJob failed: ClientException: .*no-such-definition"), weave() as w:

        @w.do(environment="jobs")
        def never() -> int:
            return 1


def test_docs_example_runs(aws_batch: BatchSetup, tmp_path: Path) -> None:
    page = (ROOT / "docs" / "backends" / "aws_batch.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    script = tmp_path / "example.py"
    script.write_text(next(block for block in blocks if "wove.config" in block))
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": aws_batch.emulator.endpoint_url,  # boto3 sends every call to the emulator
        "WOVE_BATCH_QUEUE": aws_batch.job_queue,
        "WOVE_BATCH_JOB_DEFINITION": aws_batch.job_definition,
        "AWS_DEFAULT_REGION": REGION,
    }
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "total 15.0 priced by jobs" in done.stdout and "succeeded" in done.stdout
