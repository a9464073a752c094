"""The ``celery`` backend against real Celery prefork workers and a real Redis broker.

Workers are ``python -m celery -A wove.integrations.celery_worker worker`` subprocesses (the documented command), run
from the repository root so they import the test task functions. Each scenario that kills or reconfigures a worker
gets a worker, a queue and a Redis database of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celery  # a missing Celery fails this module, in CI and locally
import pytest
from celery.signals import after_task_publish
from redis import Redis

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
from wove.errors import BackendUnavailableError, ConfigError
from wove.integrations import get_adapter_class
from wove.integrations.celery import TASK_NAME, CeleryAdapter
from wove.result import RunRecord

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

#: Redis databases of this module: the shared worker, the killed workers, the redelivery workers.
MAIN_DB, KILL_DB, REDELIVERY_DB = 4, 5, 6
HEARTBEAT = 2.0
#: Pool children of every prefork worker here.
CONCURRENCY = 2


def start_celery(
    log_dir: Path,
    broker: str,
    queue: str,
    *,
    app: str = "wove.integrations.celery_worker",
    concurrency: int = CONCURRENCY,
    pool: str = "prefork",
    env: dict[str, str] | None = None,
) -> WorkerProcess:
    """A worker (prefork unless told) consuming ``queue``, started as the docs say, ready when it logs so."""
    name = f"{queue.split(',')[0]}-{uuid.uuid4().hex[:6]}"
    command = python_command("celery", "-A", app, "worker", "-P", pool, "-c", str(concurrency))
    command += ["-Q", queue, "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    command += ["--loglevel=INFO"]
    env = {"WOVE_CELERY_BROKER_URL": broker, **(env or {})}
    return start_worker(command, log_dir / f"{name}.log", env, " ready.", f"celery worker {name}")


def configure(broker: str, queue: str, **executor_config: Any) -> None:
    config = {"broker_url": broker, "queue": queue, **executor_config}
    wove.config(
        environments={
            "default": {},
            "jobs": {"executor": "celery", "executor_config": config, "delivery_heartbeat_seconds": HEARTBEAT},
        }
    )


class CeleryEngine(Engine):
    """A running prefork worker and where it takes work from."""

    cancel_returns_within = 10.0
    lost_within = HEARTBEAT + 2.0  # within the heartbeat window, not a timeout

    def __init__(self, worker: WorkerProcess, broker: str, queue: str, *, kill_whole_worker: bool = False) -> None:
        self.worker, self.broker, self.queue = worker, broker, queue
        self.kill_whole_worker = kill_whole_worker

    def output(self) -> str:
        return self.worker.output()

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"broker_url": self.broker, "queue": self.queue, **extra}

    def check_ran(self, record: RunRecord, pid: int) -> None:
        assert pid in self.worker.children()  # a prefork pool child of the worker
        succeeded = f"{TASK_NAME}[{record.run_id}] succeeded"  # the run id is the Celery task id
        wait_for(lambda: succeeded in self.output(), 10, "celery logs the task by the run id")

    def check_mapped(self, records: list[RunRecord], pids: set[int]) -> None:
        assert pids <= self.worker.children()

    def check_failed(self, record: RunRecord) -> None:
        failed = "raised unexpected: InventoryError"
        wait_for(lambda: failed in self.output(), 10, "celery records the task as failed")

    def check_started(self, pids: list[int]) -> None:
        assert set(pids) <= self.worker.children()

    async def saw_cancel(self, records: list[RunRecord], pids: list[int]) -> None:
        await await_for(lambda: all(gone(pid) for pid in pids), 10, f"pool children {pids} were killed")  # SIGKILL
        await await_for(lambda: len(self.worker.children()) == CONCURRENCY, 10, "celery replaced the pool child")

    def kill(self, pid: int) -> None:
        if self.kill_whole_worker:
            kill_group(self.worker)
        else:
            super().kill(pid)

    @contextlib.contextmanager
    def watch_carried(self) -> Iterator[list[int]]:
        published: list[int] = []

        def measure(body: Any = None, **_: Any) -> None:
            published.append(len(json.dumps(body)))

        after_task_publish.connect(measure, weak=False)
        try:
            yield published  # what went to the broker
        finally:
            after_task_publish.disconnect(measure)


@pytest.fixture(scope="module")
def main_engine(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryEngine]:
    broker, queue = redis_server.url(MAIN_DB), "wove-test-main"
    worker = start_celery(tmp_path_factory.mktemp("celery"), broker, f"{queue},wove")  # "wove": the docs example
    yield CeleryEngine(worker, broker, queue)
    worker.stop()


@pytest.fixture
def engine(main_engine: CeleryEngine) -> CeleryEngine:
    """The ``jobs`` environment on the shared worker."""
    configure(main_engine.broker, main_engine.queue)
    return main_engine


@pytest.fixture(params=["pool child", "whole worker"])
def victim(request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path: Path) -> Iterator[CeleryEngine]:
    """A worker of this test only, on a queue of its own; the test kills one of its pool children, or all of it."""
    broker, queue = redis_server.url(KILL_DB), f"wove-test-kill-{uuid.uuid4().hex[:6]}"
    worker = start_celery(tmp_path, broker, queue)
    configure(broker, queue)
    yield CeleryEngine(worker, broker, queue, kill_whole_worker=request.param == "whole worker")
    worker.stop()


class TestScenarios(BackendScenarios):
    """The shared scenarios on Celery."""


# -- cancelling --------------------------------------------------------------------------------------------------------


async def test_cancelled_queued_task_never_runs(engine: CeleryEngine, tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    driver = await Driver.start(CeleryAdapter, "celery", engine.config())
    try:
        busy = [await driver.submit(tally, path=str(tmp_path / "busy"), value=i, seconds=1.5) for i in range(2)]
        await await_for(lambda: count_lines(tmp_path / "busy") == 2, 20, "both pool children are busy")
        queued = await driver.submit(tally, path=str(ran), value=7)
        await driver.executor.send({"type": "cancel_task", "run_id": queued, "task_id": None})
        assert (await driver.outcome(queued))["type"] == "task_cancelled"
        for run_id in busy:
            assert (await driver.outcome(run_id))["type"] == "task_result"
        await asyncio.sleep(0.5)  # a free child would have taken the revoked message by now
        assert not ran.exists() and driver.kinds(queued) == ["task_cancelled"]
        discarded = f"Discarding revoked task: {TASK_NAME}[{queued}]"
        wait_for(lambda: discarded in engine.output(), 10, "the worker discarded it")
    finally:
        await driver.close()


def test_warm_shutdown_of_a_solo_worker_lets_the_run_finish(redis_server: RedisServer, tmp_path: Path) -> None:
    """The solo pool runs tasks in the main thread, where SIGTERM means "finish, then stop", not cancel."""
    queue = f"wove-test-solo-{uuid.uuid4().hex[:6]}"
    worker = start_celery(tmp_path, redis_server.url(KILL_DB), queue, pool="solo", concurrency=1)
    try:
        configure(redis_server.url(KILL_DB), queue)
        pid_file = tmp_path / "pid"

        def terminate_when_started() -> None:
            wait_for(lambda: read_pid(pid_file) is not None, 20, "the task started")
            worker.process.terminate()

        timer = threading.Thread(target=terminate_when_started)
        timer.start()
        with weave() as w:

            @w.do(environment="jobs")
            def finishing() -> str:
                return nap(1.0, str(pid_file))

        timer.join()
        assert w.result.finishing == "rested"
        assert worker.process.wait(15) == 0  # and then the worker stopped, as asked
    finally:
        worker.stop()


# -- duplicate deliveries ------------------------------------------------------------------------------------------


def test_redelivery_after_the_result_resolves_the_run_once(redis_server: RedisServer, tmp_path: Path) -> None:
    """acks_late: the worker dies after posting the result, before acknowledging; another worker gets the message."""
    broker, queue = redis_server.url(REDELIVERY_DB), f"wove-test-redelivery-{uuid.uuid4().hex[:6]}"
    app = "tests.integration.celery_redelivery_app"
    marker, runs = tmp_path / "died", tmp_path / "runs"
    dying = {"TEST_BROKER_URL": broker, "TEST_DIE_AFTER_RESULT": str(marker)}
    first = start_celery(tmp_path, broker, queue, app=app, env=dying)
    try:
        configure(broker, queue)
        with weave() as w:

            @w.do(environment="jobs")
            def once() -> int:
                return tally(str(runs), 42)

        assert w.result.once == 42
        (record,) = w.result.records["once"]
        wait_for(lambda: not first.alive(), 10, "the first worker killed itself after the result")
        assert marker.exists()
        client = Redis.from_url(broker)
        assert client.hlen("unacked") == 1  # the message was never acknowledged
    finally:
        first.stop()
    second = start_celery(tmp_path, broker, queue, app=app, env={"TEST_BROKER_URL": broker})
    try:
        skipped = f"run {record.run_id} of task 'once' is no longer pending"
        wait_for(lambda: skipped in second.output(), 20, "the message was redelivered")
        wait_for(lambda: f"{TASK_NAME}[{record.run_id}] succeeded" in second.output(), 10, "the copy ended quietly")
        wait_for(lambda: client.hlen("unacked") == 0, 10, "the copy was acknowledged")
        assert count_lines(runs) == 1  # the task body ran once: the copy stopped before it
    finally:
        second.stop()


async def test_concurrent_copies_resolve_the_run_once(engine: CeleryEngine, tmp_path: Path) -> None:
    """Two deliveries of one payload at once: the copy's start is refused, so the task body runs once, the copy's
    Celery task still succeeds (a duplicate is no failure), and the run resolves once."""
    runs = tmp_path / "runs"
    copies: list[str] = []

    class TwiceDelivered(CeleryAdapter):
        async def submit(self, payload: Any, frame: Any) -> str:
            submission = await super().submit(payload, frame)
            copy_id = f"{frame['run_id']}-copy"
            await self.run_blocking(self.app.send_task, TASK_NAME, args=(payload,), task_id=copy_id, queue=self.queue)
            copies.append(copy_id)
            return submission

    driver = await Driver.start(TwiceDelivered, "celery", engine.config())
    try:
        run_id = await driver.submit(tally, path=str(runs), value=5, seconds=0.5, delivery={"heartbeat_seconds": 0.6})
        assert (await driver.outcome(run_id))["result"] == 5
        await await_for(lambda: f"{TASK_NAME}[{copies[0]}] succeeded" in engine.output(), 10, "the copy succeeded")
        await asyncio.sleep(0.3)
    finally:
        await driver.close()
    assert count_lines(runs) == 1  # the body ran once ...
    kinds = driver.kinds(run_id)
    assert kinds.count("task_result") == 1 and kinds[-1] == "task_result"  # ... and the run resolved once
    assert f"{TASK_NAME}[{copies[0]}] raised" not in engine.output()


# -- configuration -----------------------------------------------------------------------------------------------------


def test_docs_example_runs(engine: CeleryEngine, tmp_path: Path) -> None:
    env = {"WOVE_CELERY_BROKER_URL": engine.broker}
    done = run_doc_example(ROOT / "docs" / "backends" / "celery.md", "wove.config", env, tmp_path)
    assert "total 15.0 priced by pool children" in done.stdout and "succeeded" in done.stdout


def test_registered_under_its_name() -> None:
    assert get_adapter_class("celery") is CeleryAdapter
    assert "wove[celery]" in CeleryAdapter.install_hint


def test_an_existing_app_object(engine: CeleryEngine) -> None:
    app = celery.Celery("mine", broker=engine.broker, set_as_current=False)
    config = {"app": app, "queue": engine.queue, "send_task_options": {"priority": 3}}
    wove.config(environments={"default": {}, "jobs": {"executor": "celery", "executor_config": config}})
    try:
        with weave() as w:

            @w.do(environment="jobs")
            def remote() -> int:
                return add(1, 2)

        assert w.result.remote == 3
        wove.shutdown()
        app.send_task("wove-test.unused", queue="wove-test-unused")  # the adapter left the given app open
    finally:
        app.close()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "needs executor_config\\['app'\\] or executor_config\\['broker_url'\\]"),
        ({"app": object()}, "must be a celery.Celery app"),
        ({"broker_url": "redis://x", "send_task_options": {"task_id": "x"}}, "may not set task_id"),
        ({"broker_url": "redis://x", "cancel_signal": "SIGNOPE"}, "must name a signal"),
        ({"broker_url": "redis://x", "queue": ""}, "'queue'\\] must be a non-empty string"),
    ],
)
def test_bad_configuration_fails_clearly(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CeleryAdapter(name="jobs", config=config, callback_url="http://127.0.0.1:1", run_config={})


class CeleryConfig:
    """Settings a deployment passes with ``WOVE_CELERY_CONFIG``."""

    worker_prefetch_multiplier = 4
    task_time_limit = 600


def test_the_shipped_worker_app_reads_the_environment() -> None:
    from wove.integrations.celery_worker import create_app

    plain = create_app({"WOVE_CELERY_BROKER_URL": "redis://broker:6379/3", "WOVE_CELERY_QUEUE": "reports"})
    assert plain.conf.broker_url == "redis://broker:6379/3" and plain.conf.task_default_queue == "reports"
    assert plain.conf.worker_prefetch_multiplier == 1
    plain.finalize()
    task = plain.tasks[TASK_NAME]
    assert task.acks_late and task.ignore_result and not task.reject_on_worker_lost
    configured = create_app({"WOVE_CELERY_CONFIG": f"{__name__}:CeleryConfig"})
    assert configured.conf.worker_prefetch_multiplier == 4  # the deployment's choice wins over wove's default
    assert configured.conf.task_time_limit == 600 and configured.conf.task_default_queue == "wove"


def test_cancel_signal_spellings() -> None:
    for value in ("KILL", "sigkill", 9, signal.SIGKILL):
        adapter = CeleryAdapter(
            name="j", config={"broker_url": "redis://x", "cancel_signal": value}, callback_url="", run_config={}
        )
        assert adapter.cancel_signal == "SIGKILL"


def test_unreachable_broker_is_reported_at_start() -> None:
    configure("redis://127.0.0.1:1/0", "nowhere")
    began = time.monotonic()
    with (
        pytest.raises(BackendUnavailableError, match=r"\(celery\): start failed at redis://.*127\.0\.0\.1:1/0"),
        weave() as w,
    ):

        @w.do(environment="jobs")
        def never() -> int:
            return 1

    assert time.monotonic() - began < 10
