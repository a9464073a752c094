"""The ``rq`` backend against real ``rq worker`` processes and a real Redis server.

The shared worker is a ``SimpleWorker`` (the low-latency setup the docs show first); cancelling a running task and
killing a work horse use the default forking ``Worker``. Workers run from the repository root so they import the
test task functions.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
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
    WorkerProcess,
    await_for,
    count_lines,
    gone,
    kill_group,
    python_command,
    read_pid,
    run_doc_example,
    start_worker,
    wait_for,
)
from tests.integration.remote_tasks import add, nap, tally
from tests.integration.scenarios import BackendScenarios, Engine
from tests.services.redis import RedisServer
from wove import weave
from wove.environment.remote import BackendAdapterEnvironmentExecutor
from wove.errors import BackendUnavailableError, ConfigError, DeliveryLostError, RunCancelledError
from wove.integrations import get_adapter_class
from wove.integrations.rq import WORKER_FUNCTION, RQAdapter
from wove.result import RunRecord

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

#: Redis database of this module (the Celery tests use 4-6).
DB = 7
HEARTBEAT = 2.0
SIMPLE, FORKING = "wove.integrations.rq_worker.SimpleWorker", "wove.integrations.rq_worker.Worker"


class RQEngine(Engine):
    """A running ``rq worker`` and the queue it listens on."""

    cancel_returns_within = 10.0

    def __init__(self, worker: WorkerProcess, url: str, queue: str, forking: bool) -> None:
        self.worker, self.url, self.queue, self.forking = worker, url, queue, forking

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"redis_url": self.url, "queue_name": self.queue, **extra}

    def configure(self, heartbeat: float | None = HEARTBEAT, **extra: Any) -> None:
        config = self.config(**extra)
        environment = {"executor": "rq", "executor_config": config, "delivery_heartbeat_seconds": heartbeat}
        wove.config(environments={"default": {}, "jobs": environment})

    def job(self, job_id: str) -> Job:
        return Job.fetch(job_id, connection=Redis.from_url(self.url))

    def check_ran(self, record: RunRecord, pid: int) -> None:
        assert pid == self.worker.pid  # a SimpleWorker runs jobs in its own process
        job = self.job(str(record.run_id))  # the run id is the RQ job id
        wait_for(lambda: job.get_status() == JobStatus.FINISHED, 10, "RQ records the job finished")
        assert job.func_name == WORKER_FUNCTION
        assert job.description == f"wove task {record.task!r} run {record.run_id}"
        assert job.return_value() is None  # the value went to the weave, not into Redis

    def check_mapped(self, records: list[RunRecord], pids: set[int]) -> None:
        assert pids == {self.worker.pid}

    def check_failed(self, record: RunRecord) -> None:
        wait_for(lambda: self.job(str(record.run_id)).get_status() == JobStatus.FAILED, 10, "RQ records the job failed")

    def check_started(self, pids: list[int]) -> None:
        for pid in pids:  # a forking Worker runs each job in a work horse; a SimpleWorker in itself
            assert (pid != self.worker.pid) if self.forking else (pid == self.worker.pid)
        queue = rq.Queue(self.queue, connection=Redis.from_url(self.url))
        assert len(StartedJobRegistry(queue=queue).get_job_ids()) == len(pids)  # RQ has them as started

    async def saw_cancel(self, records: list[RunRecord], pids: list[int]) -> None:
        await await_for(lambda: all(gone(pid) for pid in pids), 10, f"work horses {pids} were killed")
        jobs = [self.job(str(record.run_id)) for record in records]
        await await_for(lambda: all(j.get_status() == JobStatus.STOPPED for j in jobs), 10, "RQ marks the job stopped")
        assert self.worker.alive()

    def kill(self, pid: int) -> None:
        if self.forking:
            super().kill(pid)  # the work horse: RQ fails the job, which the adapter watches
        else:
            kill_group(self.worker)  # the whole SimpleWorker: it goes silent, and its heartbeats stop

    async def carried_after(self, record: RunRecord, carried: list[int]) -> None:
        stored = Redis.from_url(self.url).hget(f"rq:job:{record.run_id}", "data")  # what RQ keeps for the job
        if stored is not None:
            carried.append(len(stored))


def start_engine(log_dir: Path, url: str, queue: str, worker_class: str = SIMPLE, *also: str) -> RQEngine:
    """``rq worker -u URL -w CLASS QUEUE`` as the docs say, ready once it listens."""
    name = f"{queue}-{uuid.uuid4().hex[:6]}"
    command = python_command("rq.cli", "worker", "-u", url, "-w", worker_class, "-n", name, queue, *also)
    worker = start_worker(command, log_dir / f"{name}.log", None, "Listening on", f"rq worker {name}")
    return RQEngine(worker, url, queue, forking=worker_class == FORKING)


@pytest.fixture(scope="module")
def main_engine(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RQEngine]:
    engine = start_engine(tmp_path_factory.mktemp("rq"), redis_server.url(DB), "wove-test-main", SIMPLE, "wove")
    yield engine
    engine.worker.stop()


@pytest.fixture
def engine(main_engine: RQEngine) -> RQEngine:
    """The ``jobs`` environment on the shared ``SimpleWorker``."""
    main_engine.configure()
    return main_engine


@pytest.fixture
def forking(redis_server: RedisServer, tmp_path: Path) -> Iterator[RQEngine]:
    """A forking ``Worker`` of this test only, with the ``jobs`` environment pointing at it."""
    engine = start_engine(tmp_path, redis_server.url(DB), f"wove-test-fork-{uuid.uuid4().hex[:6]}", FORKING)
    engine.configure()
    yield engine
    engine.worker.stop()


@pytest.fixture(params=["simple worker", "work horse"], ids=["simple-worker-by-heartbeat", "work-horse-by-rq-status"])
def victim(request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path: Path) -> Iterator[RQEngine]:
    """A dead SimpleWorker goes silent (heartbeats); a dead work horse is failed by RQ, which the adapter watches."""
    worker_class = SIMPLE if request.param == "simple worker" else FORKING
    engine = start_engine(tmp_path, redis_server.url(DB), f"wove-test-kill-{uuid.uuid4().hex[:6]}", worker_class)
    if engine.forking:
        engine.configure(heartbeat=None)
        engine.lost_within, engine.lost_message = 3.0, "Work-horse terminated unexpectedly"
    else:
        engine.configure()
        engine.lost_within = HEARTBEAT + 2.0
    yield engine
    engine.worker.stop()


class TestScenarios(BackendScenarios):
    """The shared scenarios on RQ."""

    @pytest.fixture
    def cancelling(self, forking: RQEngine) -> RQEngine:
        """A SimpleWorker cannot stop a started job (see below); the forking Worker kills the work horse."""
        return forking


# -- cancelling --------------------------------------------------------------------------------------------------------


async def test_cancelled_queued_job_never_runs(engine: RQEngine, tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    driver = await Driver.start(RQAdapter, "rq", engine.config())
    try:
        busy = await driver.submit(tally, path=str(tmp_path / "busy"), value=1, seconds=1.0)
        await await_for(lambda: count_lines(tmp_path / "busy") == 1, 20, "the worker is busy")
        queued = await driver.submit(tally, path=str(ran), value=7)
        await driver.executor.send({"type": "cancel_task", "run_id": queued, "task_id": None})
        assert (await driver.outcome(queued))["type"] == "task_cancelled"
        assert engine.job(queued).get_status() == JobStatus.CANCELED
        assert (await driver.outcome(busy))["result"] == 1
        await asyncio.sleep(0.3)  # the worker would have taken the next job by now
        assert not ran.exists() and driver.kinds(queued) == ["task_cancelled"]
    finally:
        await driver.close()


async def test_a_simple_worker_cannot_stop_a_started_job(engine: RQEngine, tmp_path: Path) -> None:
    """Documented limit: the weave moves on at once; the job finishes on the worker and its frames are dropped."""
    driver = await Driver.start(RQAdapter, "rq", engine.config())
    try:
        run_id = await driver.submit(tally, path=str(tmp_path / "ran"), value=3, seconds=0.5)
        await await_for(lambda: "task_started" in driver.kinds(run_id), 20, "the task started")
        await driver.executor.send({"type": "cancel_task", "run_id": run_id, "task_id": None})
        assert (await driver.outcome(run_id))["type"] == "task_cancelled"
        await await_for(lambda: engine.job(run_id).get_status() == JobStatus.FINISHED, 10, "the job ran to its end")
        assert driver.kinds(run_id) == ["task_started", "task_cancelled"]
    finally:
        await driver.close()


def test_warm_shutdown_of_a_simple_worker_lets_the_run_finish(redis_server: RedisServer, tmp_path: Path) -> None:
    """SIGTERM asks RQ to stop after the current job; wove's entrypoint must not take it as a cancel."""
    engine = start_engine(tmp_path, redis_server.url(DB), f"wove-test-warm-{uuid.uuid4().hex[:6]}", SIMPLE)
    try:
        engine.configure()
        pid_file = tmp_path / "pid"
        timer = threading.Thread(target=_terminate_when_started, args=(engine, pid_file))
        timer.start()
        with weave() as w:

            @w.do(environment="jobs")
            def finishing() -> str:
                return nap(1.0, str(pid_file))

        timer.join()
        assert w.result.finishing == "rested"
        assert engine.worker.process.wait(10) == 0  # and then the worker stopped, as asked
    finally:
        engine.worker.stop()


def _terminate_when_started(engine: RQEngine, pid_file: Path) -> None:
    wait_for(lambda: read_pid(pid_file) is not None, 20, "the task started")
    engine.worker.process.terminate()


class Misdirected(RQAdapter):
    worker_function = "wove.integrations.rq_worker.no_such_function"


def test_a_job_rq_fails_before_wove_runs_ends_the_run(engine: RQEngine) -> None:
    """As when a worker lacks wove: RQ fails the job, no frame ever comes, the adapter reports it (no heartbeat)."""
    executor = partial(BackendAdapterEnvironmentExecutor, "jobs", Misdirected)
    environment = {"executor": executor, "executor_config": engine.config(watch_interval=0.2)}
    wove.config(environments={"default": {}, "jobs": environment})
    began = time.monotonic()
    with pytest.raises(DeliveryLostError, match="Invalid attribute name: no_such_function"), weave() as w:

        @w.do(environment="jobs")
        def never() -> int:
            return 1

    assert time.monotonic() - began < 5
    assert w.result.records["never"][0].status == "failed"


async def test_a_job_stopped_from_rq_cancels_the_run(forking: RQEngine, tmp_path: Path) -> None:
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


def test_job_timeout_passes_through_and_cancels_the_run(engine: RQEngine, tmp_path: Path) -> None:
    engine.configure(enqueue_options={"job_timeout": 1, "result_ttl": 60})
    with pytest.raises(RunCancelledError), weave() as w:

        @w.do(environment="jobs")
        def slow() -> str:
            return nap(5, str(tmp_path / "pid"))

    (record,) = w.result.records["slow"]
    job = engine.job(str(record.run_id))
    assert job.timeout == 1 and job.result_ttl == 60
    wait_for(lambda: job.get_status() == JobStatus.FAILED, 10, "RQ fails the job that timed out")


@pytest.mark.parametrize("options", [{"result_ttl": 60}, {"result_ttl": 60, "unique": False}], ids=["pipeline", "each"])
def test_a_mapped_task_enqueues_every_item_with_its_options(engine: RQEngine, options: dict[str, Any]) -> None:
    # Options prepare_data takes send the batch through one pipeline (enqueue_many); others (unique) go job by job.
    engine.configure(enqueue_options=options)
    with weave() as w:

        @w.do(range(12), environment="jobs")
        def doubled(item: int) -> int:
            return item * 2

    assert w.result.doubled == [i * 2 for i in range(12)]
    jobs = [engine.job(str(record.run_id)) for record in w.result.records["doubled"]]
    assert all(job.result_ttl == 60 and "doubled" in str(job.description) for job in jobs)
    assert len({job.id for job in jobs}) == 12


# -- duplicate deliveries ------------------------------------------------------------------------------------------


async def test_a_copy_of_a_resolved_run_does_not_run_again(engine: RQEngine, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    payloads: list[dict[str, Any]] = []

    class Spy(RQAdapter):
        async def submit(self, payload: Any, frame: Any) -> str:
            payloads.append(payload)
            return await super().submit(payload, frame)

    driver = await Driver.start(Spy, "rq", engine.config())
    try:
        run_id = await driver.submit(tally, path=str(runs), value=9)
        assert (await driver.outcome(run_id))["result"] == 9
        queue = rq.Queue(engine.queue, connection=Redis.from_url(engine.url))
        copy = queue.enqueue_call(WORKER_FUNCTION, args=(payloads[0],), job_id=f"{run_id}-copy")
        await await_for(lambda: copy.get_status(refresh=True) == JobStatus.FINISHED, 10, "the copy ended quietly")
        assert count_lines(runs) == 1  # the callback server refused the copy before the task body ran
        assert driver.kinds(run_id) == ["task_started", "task_result"]
    finally:
        await driver.close()


# -- configuration -----------------------------------------------------------------------------------------------------


def test_docs_example_runs(engine: RQEngine, tmp_path: Path) -> None:
    env = {"REDIS_URL": engine.url}  # the shared worker also listens on the default queue, "wove"
    done = run_doc_example(ROOT / "docs" / "backends" / "rq.md", "wove.config", env, tmp_path)
    assert "total 15.0 priced by workers" in done.stdout and "succeeded" in done.stdout


def test_registered_under_its_name() -> None:
    assert get_adapter_class("rq") is RQAdapter
    assert "wove[rq]" in RQAdapter.install_hint


@pytest.mark.parametrize("given", ["queue", "connection"])
def test_an_existing_queue_or_connection(given: str, engine: RQEngine) -> None:
    connection = Redis.from_url(engine.url)
    config: dict[str, Any] = {"queue": rq.Queue(engine.queue, connection=connection)}
    if given == "connection":
        config = {"connection": connection, "queue_name": engine.queue}
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


def test_unknown_enqueue_option_fails_at_start(engine: RQEngine) -> None:
    engine.configure(enqueue_options={"job_timout": 5})
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
