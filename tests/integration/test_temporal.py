"""The ``temporal`` backend against a real Temporal dev server and real ``wove.integrations.temporal_worker`` processes.

The shared worker polls the default task queue, ``wove``; tests that need a queue nobody polls, or a worker they may
kill, make their own. Workers run from the repository root so they import this module's task functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import (  # missing: the module fails
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowFailureError,
)

import wove
from tests.integration.queue_support import ROOT, await_for, read_pid, wait_for
from tests.integration.scenarios import unreachable_run_fails
from tests.services.base import ManagedProcess, free_port, wait_until
from tests.services.temporal import TemporalServer
from wove import weave
from wove.errors import BackendUnavailableError, DeliveryLostError, RunCancelledError
from wove.integrations import get_adapter_class
from wove.integrations.temporal import TemporalAdapter, failure_text

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

#: Seconds between heartbeats the test workers send to Temporal: a cancel reaches a running task within it.
THROTTLE = "0.5"


class CustomError(Exception):
    """Raised in a worker; arrives as itself because this module is importable there."""


def add(a: int, b: int) -> int:
    return a + b


def where() -> int:
    return os.getpid()


def fail(message: str) -> None:
    raise CustomError(message)


def size_of(blob: bytes) -> int:
    return len(blob)


def nap(seconds: float, pid_file: str) -> str:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)
    return "rested"


async def wait_for_cancel(marker: str) -> str:
    """Record the workflow running this task (Temporal's activity context reaches task code), then wait."""
    from temporalio import activity

    Path(f"{marker}.started").write_text(activity.info().workflow_id)
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        Path(f"{marker}.cancelled").write_text("cancelled")
        raise
    return "not cancelled"


# -- workers and helpers ----------------------------------------------------------------------------------------------


def start_worker(
    log_dir: Path, server: TemporalServer, queue: str = "wove", *extra: str, env: dict[str, str] | None = None
) -> ManagedProcess:
    """``python -m wove.integrations.temporal_worker`` as the docs say, ready once it polls."""
    command = [
        sys.executable,
        "-m",
        "wove.integrations.temporal_worker",
        "--target-host",
        server.address,
        "--namespace",
        "default",
        "--task-queue",
        queue,
        "--heartbeat-throttle",
        THROTTLE,
        *extra,
    ]
    log = log_dir / f"worker-{queue}-{uuid.uuid4().hex[:6]}.log"
    process = ManagedProcess(
        command, log, env={"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=ROOT
    )
    try:
        wait_until(lambda: "polling task queue" in process.output() or not process.alive(), 60, "temporal worker", log)
        assert process.alive(), process.output()
    except BaseException:
        stop_worker(process)
        raise
    return process


def stop_worker(worker: ManagedProcess) -> None:
    """SIGTERM (the worker shuts down gracefully), then SIGKILL to whatever is left of its session."""
    try:
        worker.stop(timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.pid, signal.SIGKILL)


def kill_worker(worker: ManagedProcess) -> None:
    """SIGKILL the worker, as a lost machine or an OOM kill would."""
    os.killpg(worker.pid, signal.SIGKILL)
    worker.process.wait(10)


def configure(server: TemporalServer, delivery_timeout: float | None = None, **executor_config: Any) -> None:
    config = {"target_host": server.address, **executor_config}
    environment: dict[str, Any] = {"executor": "temporal", "executor_config": config}
    if delivery_timeout is not None:
        environment["delivery_timeout"] = delivery_timeout
    wove.config(progress=False, environments={"default": {}, "jobs": environment})


def describe(server: TemporalServer, workflow_id: str) -> WorkflowExecutionDescription:
    async def run() -> WorkflowExecutionDescription:
        client = await Client.connect(server.address)
        return await client.get_workflow_handle(workflow_id).describe()

    return asyncio.run(run())


def status_of(server: TemporalServer, workflow_id: str) -> WorkflowExecutionStatus | None:
    return describe(server, workflow_id).status


async def await_status(server: TemporalServer, workflow_id: str, status: WorkflowExecutionStatus, what: str) -> None:
    client = await Client.connect(server.address)
    handle = client.get_workflow_handle(workflow_id)
    deadline = time.monotonic() + 20
    while (await handle.describe()).status != status:
        assert time.monotonic() < deadline, f"{what}: not true after 20s"
        await asyncio.sleep(0.05)


def running_in(server: TemporalServer, queue: str) -> list[str]:
    """Ids of the running workflows on ``queue`` (Temporal's visibility store)."""

    async def run() -> list[str]:
        client = await Client.connect(server.address)
        query = f"TaskQueue = '{queue}' AND ExecutionStatus = 'Running'"
        return [execution.id async for execution in client.list_workflows(query)]

    return asyncio.run(run())


@pytest.fixture(scope="module")
def main_worker(temporal_server: TemporalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    worker = start_worker(tmp_path_factory.mktemp("temporal-worker"), temporal_server)
    yield worker
    stop_worker(worker)


@pytest.fixture
def jobs(temporal_server: TemporalServer, main_worker: ManagedProcess) -> TemporalServer:
    """The ``jobs`` environment on the shared worker's queue."""
    configure(temporal_server)
    return temporal_server


# -- the weave ---------------------------------------------------------------------------------------------------------


def test_local_and_remote_tasks(jobs: TemporalServer, main_worker: ManagedProcess) -> None:
    with weave(n=20) as w:

        @w.do
        def local(n: int) -> int:
            return n + 1

        @w.do(environment="jobs")
        def remote(local: int) -> tuple[int, int]:
            return add(local, 1), where()

    value, pid = w.result.remote
    assert value == 22 and pid == main_worker.pid  # activities run in the worker process
    (record,) = w.result.records["remote"]
    workflow_id = f"wove-remote-{record.run_id}"
    assert record.status == "succeeded" and record.submission in (workflow_id, None)  # None: the worker won the race
    wait_for(lambda: status_of(jobs, workflow_id) == WorkflowExecutionStatus.COMPLETED, 10, "Temporal completes it")
    description = describe(jobs, workflow_id)
    assert description.workflow_type == "WoveRun" and description.task_queue == "wove"


def test_remote_task_mapped_over_5_items(jobs: TemporalServer) -> None:
    with weave(items=list(range(5))) as w:

        @w.do("items", environment="jobs")
        def squared(item: int) -> int:
            return item * item

    assert w.result.squared == [0, 1, 4, 9, 16]
    runs = {str(record.run_id) for record in w.result.records["squared"]}
    assert len(runs) == 5
    for run_id in runs:  # a workflow per run
        assert describe(jobs, f"wove-squared-{run_id}").workflow_type == "WoveRun"


def test_remote_exception_keeps_its_type(jobs: TemporalServer) -> None:
    with pytest.raises(CustomError, match="bad input"), weave() as w:

        @w.do(environment="jobs")
        def broken() -> None:
            fail("bad input")

    (record,) = w.result.records["broken"]
    workflow_id = f"wove-broken-{record.run_id}"
    wait_for(lambda: status_of(jobs, workflow_id) == WorkflowExecutionStatus.FAILED, 10, "Temporal fails the workflow")

    async def failure() -> str:
        client = await Client.connect(jobs.address)
        try:
            await client.get_workflow_handle(workflow_id).result()
        except WorkflowFailureError as exc:
            return failure_text(exc.cause)
        return "no failure"

    assert asyncio.run(failure()).endswith("task 'broken' raised: bad input (CustomError)")  # not retried by Temporal


async def test_cancelling_the_weave_cancels_the_workflow_and_its_task(jobs: TemporalServer, tmp_path: Path) -> None:
    marker = tmp_path / "run"
    started, cancelled = Path(f"{marker}.started"), Path(f"{marker}.cancelled")

    async def run() -> None:
        async with weave() as w:

            @w.do(environment="jobs")
            async def sleepy() -> str:
                return await wait_for_cancel(str(marker))

    running = asyncio.ensure_future(run())
    await await_for(started.exists, 30, "the task started")
    workflow_id = started.read_text()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 10)
    await await_status(jobs, workflow_id, WorkflowExecutionStatus.CANCELED, "Temporal shows the workflow CANCELED")
    assert cancelled.exists()  # the workflow waited for the activity, which cancelled the task


async def test_a_workflow_cancelled_from_temporal_cancels_the_run(jobs: TemporalServer, tmp_path: Path) -> None:
    marker = tmp_path / "run"
    started = Path(f"{marker}.started")

    async def run() -> None:
        async with weave() as w:

            @w.do(environment="jobs")
            async def sleepy() -> str:
                return await wait_for_cancel(str(marker))

    running = asyncio.ensure_future(run())
    await await_for(started.exists, 30, "the task started")
    client = await Client.connect(jobs.address)
    await client.get_workflow_handle(started.read_text()).cancel()  # an operator, Temporal's UI, ...
    with pytest.raises(RunCancelledError):
        await asyncio.wait_for(running, 20)
    assert Path(f"{marker}.cancelled").exists()


def test_a_workflow_terminated_before_any_worker_ran_it(temporal_server: TemporalServer) -> None:
    """Queued on a task queue nobody polls, then terminated: the weave gets Temporal's reason, not a timeout."""
    queue = f"nobody-{uuid.uuid4().hex[:8]}"
    configure(temporal_server, delivery_timeout=3600, task_queue=queue)
    outcome: dict[str, BaseException] = {}
    thread = threading.Thread(target=_run_one, args=(outcome,))
    thread.start()
    wait_for(lambda: bool(running_in(temporal_server, queue)), 20, "the workflow is queued")
    (workflow_id,) = running_in(temporal_server, queue)

    async def terminate() -> None:
        client = await Client.connect(temporal_server.address)
        await client.get_workflow_handle(workflow_id).terminate(reason="operator: wrong input file")

    asyncio.run(terminate())
    thread.join(20)  # far below delivery_timeout
    assert not thread.is_alive(), "the weave waited on a terminated workflow"
    error = outcome.get("error")
    assert isinstance(error, DeliveryLostError), outcome
    assert f"Temporal workflow {workflow_id} was terminated: operator: wrong input file" in str(error)
    assert status_of(temporal_server, workflow_id) == WorkflowExecutionStatus.TERMINATED


def _run_one(outcome: dict[str, BaseException]) -> None:
    try:
        with weave() as w:

            @w.do(environment="jobs")
            def never() -> int:
                return 1

    except BaseException as exc:
        outcome["error"] = exc


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"task_queue": "nobody-polls-this", "start_workflow_options": {"execution_timeout": 1}}, "timed out"),
        (
            {"activity_options": {"task_queue": "nobody-polls-this", "schedule_to_start_timeout": 1}},
            "failed: Activity task timed out: activity ScheduleToStart timeout",
        ),
    ],
    ids=["no-worker-for-the-workflow", "no-worker-for-the-activity"],
)
def test_timeouts_before_the_task_runs_end_the_run(config: dict[str, Any], message: str, jobs: TemporalServer) -> None:
    configure(jobs, delivery_timeout=3600, **config)
    with pytest.raises(DeliveryLostError, match=re.escape(message)), weave() as w:

        @w.do(environment="jobs")
        def never() -> int:
            return 1

    assert w.result.records["never"][0].status == "failed"


def test_a_worker_that_cannot_reach_the_weave_fails_the_run(temporal_server: TemporalServer, tmp_path: Path) -> None:
    """The activity fails before the task runs (no callback server where the payload points): Temporal's failure."""
    queue = f"astray-{uuid.uuid4().hex[:8]}"
    worker = start_worker(tmp_path, temporal_server, queue, env={"WOVE_POST_DEADLINE": "1"})
    try:
        configure(
            temporal_server, delivery_timeout=3600, task_queue=queue, callback_url=f"http://127.0.0.1:{free_port()}"
        )
        unreachable = "Activity task failed: wove could not reach the weave"
        assert "(CallbackError)" in str(unreachable_run_fails(unreachable))
    finally:
        stop_worker(worker)


def test_a_killed_worker_is_reported_by_the_heartbeat_timeout(temporal_server: TemporalServer, tmp_path: Path) -> None:
    """No wove heartbeat configured: Temporal's activity heartbeat timeout notices the dead worker, and a surviving
    worker on the queue runs the workflow on to its failure (after Temporal's 10 s sticky-queue timeout at worst)."""
    queue = f"doomed-{uuid.uuid4().hex[:8]}"
    workers = [start_worker(tmp_path, temporal_server, queue) for _ in range(2)]
    try:
        configure(temporal_server, task_queue=queue, activity_options={"heartbeat_timeout": 1})
        pid_file = tmp_path / "pid"
        outcome: dict[str, BaseException] = {}

        def run() -> None:
            try:
                with weave() as w:

                    @w.do(environment="jobs")
                    def doomed() -> str:
                        return nap(60, str(pid_file))

            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        wait_for(lambda: read_pid(pid_file) is not None, 30, "the task started")
        (victim,) = [worker for worker in workers if worker.pid == read_pid(pid_file)]
        kill_worker(victim)
        thread.join(40)
        assert not thread.is_alive(), "the weave hung after its worker died"
        error = outcome.get("error")
        assert isinstance(error, DeliveryLostError), outcome
        assert "activity Heartbeat timeout" in str(error)
    finally:
        for worker in workers:
            stop_worker(worker)


def test_oversized_argument_goes_by_reference(jobs: TemporalServer) -> None:
    blob = os.urandom(1 << 20)
    with weave(blob=blob) as w:

        @w.do(environment="jobs")
        def measured(blob: bytes) -> int:
            return size_of(blob)

    assert w.result.measured == len(blob)
    (record,) = w.result.records["measured"]

    async def workflow_input() -> int:
        client = await Client.connect(jobs.address)
        history = await client.get_workflow_handle(f"wove-measured-{record.run_id}").fetch_history()
        started = history.events[0].workflow_execution_started_event_attributes
        return sum(len(payload.data) for payload in started.input.payloads)

    assert asyncio.run(workflow_input()) < 16 * 1024  # what Temporal keeps in the history: no megabyte


# -- the worker command --------------------------------------------------------------------------------------------


def _worker_command(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "wove.integrations.temporal_worker", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ})


def test_worker_command_help() -> None:
    done = _worker_command("--help")
    assert done.returncode == 0
    assert "--task-queue" in done.stdout and "--max-concurrent-activities" in done.stdout


def test_worker_command_fails_clearly_without_a_server() -> None:
    address = f"127.0.0.1:{free_port()}"
    done = _worker_command("--target-host", address, "--task-queue", "q")
    assert done.returncode == 3, done.stderr
    assert f"wove temporal worker: cannot connect to Temporal at {address} (namespace 'default')" in done.stderr


def test_worker_command_refuses_an_unknown_namespace(temporal_server: TemporalServer) -> None:
    done = _worker_command("--target-host", temporal_server.address, "--namespace", "no-such-namespace")
    assert done.returncode == 3, done.stderr
    assert "Namespace no-such-namespace" in done.stderr and "not found" in done.stderr


def test_worker_command_rejects_bad_arguments() -> None:
    done = _worker_command("--max-concurrent-activities", "0")
    assert done.returncode == 2 and "must be > 0" in done.stderr


# -- configuration -----------------------------------------------------------------------------------------------------


def test_docs_example_runs(jobs: TemporalServer, tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "backends" / "temporal.md").read_text(), flags=re.S)
    script = tmp_path / "example.py"
    script.write_text(next(block for block in blocks if "wove.config" in block))
    env = {**os.environ, "TEMPORAL_ADDRESS": jobs.address}  # the shared worker polls the default queue, "wove"
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "total 15.0 priced by workers" in done.stdout and "succeeded" in done.stdout


def test_registered_under_its_name() -> None:
    assert get_adapter_class("temporal") is TemporalAdapter
    assert "wove[temporal]" in TemporalAdapter.install_hint


def test_an_existing_client_is_used(jobs: TemporalServer) -> None:
    async def connect() -> Client:
        return await Client.connect(jobs.address)

    client = asyncio.run(connect())
    wove.config(environments={"default": {}, "jobs": {"executor": "temporal", "executor_config": {"client": client}}})
    with weave() as w:

        @w.do(environment="jobs")
        def remote() -> int:
            return add(1, 2)

    assert w.result.remote == 3


def test_unreachable_server_is_reported_at_start() -> None:
    address = f"127.0.0.1:{free_port()}"
    wove.config(
        environments={
            "default": {},
            "jobs": {"executor": "temporal", "executor_config": {"target_host": address, "api_key": "s3cret"}},
        }
    )
    with pytest.raises(BackendUnavailableError, match=f"cannot connect to Temporal at {address}") as info, weave() as w:

        @w.do(environment="jobs")
        def never() -> int:
            return 1

    assert "s3cret" not in str(info.value)
