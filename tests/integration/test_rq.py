"""The ``rq`` backend against real ``rq worker`` processes and a real Redis server.

The shared worker is a ``SimpleWorker`` (the low-latency setup the docs show first); cancelling a running task and
killing a work horse use the default forking ``Worker``. Workers run from the repository root so they import this
module's task functions.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import rq  # a missing RQ fails this module, in CI and locally
from redis import Redis
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

import wove
from tests.integration.queue_support import (
    ROOT,
    Driver,
    await_for,
    count_lines,
    gone,
    kill_group,
    read_pid,
    stop_group,
    wait_for,
    worker_env,
)
from tests.services.base import ManagedProcess, wait_until
from tests.services.redis import RedisServer
from wove import weave
from wove.environment.remote import BackendAdapterEnvironmentExecutor
from wove.errors import BackendUnavailableError, ConfigError, DeliveryLostError, RunCancelledError
from wove.integrations import get_adapter_class
from wove.integrations.rq import WORKER_FUNCTION, RQAdapter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

#: Redis database of this module (the Celery tests use 4-6).
DB = 7
HEARTBEAT = 2.0
SIMPLE, FORKING = "wove.integrations.rq_worker.SimpleWorker", "wove.integrations.rq_worker.Worker"


class CustomError(Exception):
    """Raised in a worker; arrives as itself because this module is importable there."""


def add(a: int, b: int) -> int:
    return a + b


def where() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


def fail(message: str) -> None:
    raise CustomError(message)


def nap(seconds: float, pid_file: str) -> str:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)
    return "rested"


def tally(path: str, value: int, seconds: float = 0.0) -> int:
    with open(path, "a") as out:
        out.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return value


def size_of(blob: bytes) -> int:
    return len(blob)


# -- workers ----------------------------------------------------------------------------------------------------------


@dataclass
class Worker:
    """A running ``rq worker`` and the queue it listens on."""

    process: ManagedProcess
    url: str
    queue: str

    def output(self) -> str:
        return self.process.output()

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"redis_url": self.url, "queue_name": self.queue, **extra}

    def job(self, job_id: str) -> Job:
        return Job.fetch(job_id, connection=Redis.from_url(self.url))

    def started(self) -> list[str]:
        queue = rq.Queue(self.queue, connection=Redis.from_url(self.url))
        return list(StartedJobRegistry(queue=queue).get_job_ids())


def start_worker(log_dir: Path, url: str, queue: str, worker_class: str = SIMPLE, *also: str) -> Worker:
    """``rq worker -u URL -w CLASS QUEUE`` as the docs say, ready once it listens."""
    name = f"{queue}-{uuid.uuid4().hex[:6]}"
    command = [sys.executable, "-m", "rq.cli", "worker", "-u", url, "-w", worker_class, "-n", name, queue, *also]
    log = log_dir / f"{name}.log"
    process = ManagedProcess(command, log, env=worker_env(), cwd=ROOT)
    try:
        wait_until(lambda: "Listening on" in process.output() or not process.alive(), 60, f"rq worker {name}", log)
        assert process.alive(), process.output()
    except BaseException:
        stop_group(process)
        raise
    return Worker(process, url, queue)


def configure(worker: Worker, heartbeat: float | None = HEARTBEAT, **extra: Any) -> None:
    environment = {"executor": "rq", "executor_config": worker.config(**extra), "delivery_heartbeat_seconds": heartbeat}
    wove.config(environments={"default": {}, "jobs": environment})


@pytest.fixture(scope="module")
def main_worker(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    worker = start_worker(tmp_path_factory.mktemp("rq"), redis_server.url(DB), "wove-test-main", SIMPLE, "wove")
    yield worker
    stop_group(worker.process)


@pytest.fixture
def jobs(main_worker: Worker) -> Worker:
    """The ``jobs`` environment on the shared ``SimpleWorker``."""
    configure(main_worker)
    return main_worker


@pytest.fixture
def forking(redis_server: RedisServer, tmp_path: Path) -> Iterator[Worker]:
    """A forking ``Worker`` of this test only, with the ``jobs`` environment pointing at it."""
    worker = start_worker(tmp_path, redis_server.url(DB), f"wove-test-fork-{uuid.uuid4().hex[:6]}", FORKING)
    configure(worker)
    yield worker
    stop_group(worker.process)


# -- the weave ---------------------------------------------------------------------------------------------------------


def test_local_and_remote_tasks(jobs: Worker) -> None:
    with weave(n=20) as w:

        @w.do
        def local(n: int) -> int:
            return n + 1

        @w.do(environment="jobs")
        def remote(local: int) -> tuple[int, tuple[str, int]]:
            return add(local, 1), where()

    value, (_, pid) = w.result.remote
    assert value == 22 and pid == jobs.process.pid  # a SimpleWorker runs jobs in its own process
    (record,) = w.result.records["remote"]
    assert record.status == "succeeded" and record.pid == pid
    job = jobs.job(str(record.run_id))  # the run id is the RQ job id
    wait_for(lambda: job.get_status() == JobStatus.FINISHED, 10, "RQ records the job finished")
    assert job.func_name == WORKER_FUNCTION
    assert job.description == f"wove task 'remote' run {record.run_id}"
    assert job.return_value() is None  # the value went to the weave, not into Redis


def test_remote_task_mapped_over_20_items(jobs: Worker) -> None:
    with weave(items=list(range(20))) as w:

        @w.do("items", environment="jobs")
        def squared(item: int) -> int:
            return item * item

    assert w.result.squared == [i * i for i in range(20)]


def test_remote_exception_keeps_its_type(jobs: Worker) -> None:
    with pytest.raises(CustomError, match="bad input"), weave() as w:

        @w.do(environment="jobs")
        def broken() -> None:
            fail("bad input")

    (record,) = w.result.records["broken"]
    assert record.status == "failed"
    wait_for(lambda: jobs.job(str(record.run_id)).get_status() == JobStatus.FAILED, 10, "RQ records the job failed")


async def test_cancelling_the_weave_kills_the_work_horse(forking: Worker, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    async def run() -> None:
        async with weave() as w:

            @w.do(environment="jobs")
            def sleepy() -> str:
                return nap(60, str(pid_file))

    running = asyncio.ensure_future(run())
    await await_for(lambda: read_pid(pid_file) is not None, 20, "the task started")
    horse = read_pid(pid_file)
    assert horse is not None and horse != forking.process.pid
    (job_id,) = forking.started()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 10)
    await await_for(lambda: gone(horse), 10, f"work horse {horse} was killed")
    await await_for(lambda: forking.job(job_id).get_status() == JobStatus.STOPPED, 10, "RQ marks the job stopped")
    assert forking.process.alive()
    await asyncio.to_thread(test_remote_task_mapped_over_20_items, forking)  # the worker carries on


async def test_cancelled_queued_job_never_runs(jobs: Worker, tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    driver = await Driver.start(RQAdapter, "rq", jobs.config())
    try:
        busy = await driver.submit(tally, path=str(tmp_path / "busy"), value=1, seconds=1.0)
        await await_for(lambda: count_lines(tmp_path / "busy") == 1, 20, "the worker is busy")
        queued = await driver.submit(tally, path=str(ran), value=7)
        await driver.executor.send({"type": "cancel_task", "run_id": queued, "task_id": None})
        assert (await driver.outcome(queued))["type"] == "task_cancelled"
        assert jobs.job(queued).get_status() == JobStatus.CANCELED
        assert (await driver.outcome(busy))["result"] == 1
        await asyncio.sleep(0.3)  # the worker would have taken the next job by now
        assert not ran.exists() and driver.kinds(queued) == ["task_cancelled"]
    finally:
        await driver.close()


async def test_a_simple_worker_cannot_stop_a_started_job(jobs: Worker, tmp_path: Path) -> None:
    """Documented limit: the weave moves on at once; the job finishes on the worker and its frames are dropped."""
    driver = await Driver.start(RQAdapter, "rq", jobs.config())
    try:
        run_id = await driver.submit(tally, path=str(tmp_path / "ran"), value=3, seconds=0.5)
        await await_for(lambda: "task_started" in driver.kinds(run_id), 20, "the task started")
        await driver.executor.send({"type": "cancel_task", "run_id": run_id, "task_id": None})
        assert (await driver.outcome(run_id))["type"] == "task_cancelled"
        await await_for(lambda: jobs.job(run_id).get_status() == JobStatus.FINISHED, 10, "the job ran to its end")
        assert driver.kinds(run_id) == ["task_started", "task_cancelled"]
    finally:
        await driver.close()


@pytest.mark.parametrize(
    ("victim", "heartbeat", "within"),
    [("simple worker", HEARTBEAT, HEARTBEAT + 2.0), ("work horse", None, 3.0)],
    ids=["simple-worker-by-heartbeat", "work-horse-by-rq-status"],
)
def test_killed_worker_is_reported_lost(
    victim: str, heartbeat: float | None, within: float, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A dead SimpleWorker goes silent (heartbeats); a dead work horse is failed by RQ, which the adapter watches."""
    worker_class = SIMPLE if victim == "simple worker" else FORKING
    worker = start_worker(tmp_path, redis_server.url(DB), f"wove-test-kill-{uuid.uuid4().hex[:6]}", worker_class)
    try:
        configure(worker, heartbeat=heartbeat)
        pid_file = tmp_path / "pid"
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                with weave() as w:

                    @w.do(environment="jobs")
                    def doomed() -> str:
                        return nap(60, str(pid_file))

            except BaseException as exc:
                outcome["error"], outcome["at"] = exc, time.monotonic()

        thread = threading.Thread(target=run)
        thread.start()
        wait_for(lambda: read_pid(pid_file) is not None, 20, "the task started")
        pid = read_pid(pid_file)
        assert pid is not None
        killed_at = time.monotonic()
        if victim == "simple worker":
            assert pid == worker.process.pid
            kill_group(worker.process)
        else:
            assert pid != worker.process.pid
            os.kill(pid, signal.SIGKILL)
        thread.join(within + 8)
        assert not thread.is_alive(), "the weave hung after its worker died"
        error = outcome.get("error")
        assert isinstance(error, DeliveryLostError), outcome
        assert outcome["at"] - killed_at < within  # not a timeout
        if victim == "work horse":
            assert "Work-horse terminated unexpectedly" in str(error)
    finally:
        stop_group(worker.process)


def test_warm_shutdown_of_a_simple_worker_lets_the_run_finish(redis_server: RedisServer, tmp_path: Path) -> None:
    """SIGTERM asks RQ to stop after the current job; wove's entrypoint must not take it as a cancel."""
    worker = start_worker(tmp_path, redis_server.url(DB), f"wove-test-warm-{uuid.uuid4().hex[:6]}", SIMPLE)
    try:
        configure(worker)
        pid_file = tmp_path / "pid"
        timer = threading.Thread(target=_terminate_when_started, args=(worker, pid_file))
        timer.start()
        with weave() as w:

            @w.do(environment="jobs")
            def finishing() -> str:
                return nap(1.0, str(pid_file))

        timer.join()
        assert w.result.finishing == "rested"
        assert worker.process.process.wait(10) == 0  # and then the worker stopped, as asked
    finally:
        stop_group(worker.process)


def _terminate_when_started(worker: Worker, pid_file: Path) -> None:
    wait_for(lambda: read_pid(pid_file) is not None, 20, "the task started")
    worker.process.process.terminate()


class Misdirected(RQAdapter):
    worker_function = "wove.integrations.rq_worker.no_such_function"


def test_a_job_rq_fails_before_wove_runs_ends_the_run(jobs: Worker) -> None:
    """As when a worker lacks wove: RQ fails the job, no frame ever comes, the adapter reports it (no heartbeat)."""
    executor = partial(BackendAdapterEnvironmentExecutor, "jobs", Misdirected)
    environment = {"executor": executor, "executor_config": jobs.config(watch_interval=0.2)}
    wove.config(environments={"default": {}, "jobs": environment})
    began = time.monotonic()
    with pytest.raises(DeliveryLostError, match="Invalid attribute name: no_such_function"), weave() as w:

        @w.do(environment="jobs")
        def never() -> int:
            return 1

    assert time.monotonic() - began < 5
    assert w.result.records["never"][0].status == "failed"


async def test_a_job_stopped_from_rq_cancels_the_run(forking: Worker, tmp_path: Path) -> None:
    from rq.command import send_stop_job_command

    pid_file = tmp_path / "pid"
    driver = await Driver.start(RQAdapter, "rq", forking.config(watch_interval=0.2))
    try:
        run_id = await driver.submit(nap, seconds=60, pid_file=str(pid_file))
        await await_for(lambda: read_pid(pid_file) is not None, 20, "the task started")
        send_stop_job_command(Redis.from_url(forking.url), run_id)  # an operator, RQ's dashboard, ...
        stopped = await driver.outcome(run_id, timeout=10)
        assert stopped["type"] == "task_cancelled" and "cancel_task" not in driver.kinds(run_id)
    finally:
        await driver.close()


def test_oversized_argument_goes_by_reference(jobs: Worker) -> None:
    blob = os.urandom(1 << 20)
    with weave(blob=blob) as w:

        @w.do(environment="jobs")
        def measured(blob: bytes) -> int:
            return size_of(blob)

    assert w.result.measured == len(blob)
    (record,) = w.result.records["measured"]
    stored = Redis.from_url(jobs.url).hget(f"rq:job:{record.run_id}", "data")
    assert stored is not None and len(stored) < 8 * 1024  # what RQ keeps in Redis for the job: no megabyte


def test_job_timeout_passes_through_and_cancels_the_run(jobs: Worker, tmp_path: Path) -> None:
    configure(jobs, enqueue_options={"job_timeout": 1, "result_ttl": 60})
    with pytest.raises(RunCancelledError), weave() as w:

        @w.do(environment="jobs")
        def slow() -> str:
            return nap(5, str(tmp_path / "pid"))

    (record,) = w.result.records["slow"]
    job = jobs.job(str(record.run_id))
    assert job.timeout == 1 and job.result_ttl == 60
    wait_for(lambda: job.get_status() == JobStatus.FAILED, 10, "RQ fails the job that timed out")


# -- duplicate deliveries ------------------------------------------------------------------------------------------


async def test_a_copy_of_a_resolved_run_does_not_run_again(jobs: Worker, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    payloads: list[dict[str, Any]] = []

    class Spy(RQAdapter):
        async def submit(self, payload: Any, frame: Any) -> str:
            payloads.append(payload)
            return await super().submit(payload, frame)

    driver = await Driver.start(Spy, "rq", jobs.config())
    try:
        run_id = await driver.submit(tally, path=str(runs), value=9)
        assert (await driver.outcome(run_id))["result"] == 9
        queue = rq.Queue(jobs.queue, connection=Redis.from_url(jobs.url))
        copy = queue.enqueue_call(WORKER_FUNCTION, args=(payloads[0],), job_id=f"{run_id}-copy")
        await await_for(lambda: copy.get_status(refresh=True) == JobStatus.FINISHED, 10, "the copy ended quietly")
        assert count_lines(runs) == 1  # the callback server refused the copy before the task body ran
        assert driver.kinds(run_id) == ["task_started", "task_result"]
    finally:
        await driver.close()


# -- configuration -----------------------------------------------------------------------------------------------------


def test_docs_example_runs(jobs: Worker, tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "backends" / "rq.md").read_text(), flags=re.S)
    script = tmp_path / "example.py"
    script.write_text(next(block for block in blocks if "wove.config" in block))
    env = {**os.environ, "REDIS_URL": jobs.url}  # the shared worker also listens on the default queue, "wove"
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "total 15.0 priced by workers" in done.stdout and "succeeded" in done.stdout


def test_registered_under_its_name() -> None:
    assert get_adapter_class("rq") is RQAdapter
    assert "wove[rq]" in RQAdapter.install_hint


@pytest.mark.parametrize("given", ["queue", "connection"])
def test_an_existing_queue_or_connection(given: str, jobs: Worker) -> None:
    connection = Redis.from_url(jobs.url)
    config: dict[str, Any] = {"queue": rq.Queue(jobs.queue, connection=connection)}
    if given == "connection":
        config = {"connection": connection, "queue_name": jobs.queue}
    wove.config(environments={"default": {}, "jobs": {"executor": "rq", "executor_config": config}})
    with weave() as w:

        @w.do(environment="jobs")
        def remote() -> int:
            return add(1, 2)

    assert w.result.remote == 3
    wove.shutdown()
    assert connection.ping()  # the adapter leaves what it was given open


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"queue": object()}, "must be an rq.Queue"),
        ({"enqueue_options": {"job_id": "x"}}, "may not set job_id"),
        ({"enqueue_options": {"timeout": 1, "job_timeout": 2}}, "sets both"),
        ({"queue_name": ""}, "'queue_name'\\] must be a non-empty string"),
    ],
)
def test_bad_configuration_fails_clearly(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RQAdapter(name="jobs", config=config, callback_url="http://127.0.0.1:1", run_config={})


def test_unknown_enqueue_option_fails_at_start(jobs: Worker) -> None:
    configure(jobs, enqueue_options={"job_timout": 5})
    with pytest.raises(ConfigError, match="options RQ does not know: job_timout"), weave() as w:

        @w.do(environment="jobs")
        def never() -> int:
            return 1


def test_unreachable_redis_is_reported_at_start() -> None:
    config = {"redis_url": "redis://:pw@127.0.0.1:1/0"}
    wove.config(environments={"default": {}, "jobs": {"executor": "rq", "executor_config": config}})
    refused = r"\(rq\): start failed at redis 127\.0\.0\.1:1/0"
    with pytest.raises(BackendUnavailableError, match=refused) as info, weave() as w:

        @w.do(environment="jobs")
        def never() -> int:
            return 1

    assert "pw" not in str(info.value)
