"""Weaves whose tasks run on real Taskiq workers (``taskiq worker wove.integrations.taskiq_worker:broker``) over a
real Redis, end to end: the adapter, the shipped worker broker, the callback server and the runtime's policies."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.queue_support import (
    ROOT,
    WorkerProcess,
    python_command,
    require_sdk,
    run_doc_example,
    wait_for_file,
)
from tests.integration.remote_tasks import add, hold_async
from tests.integration.scenarios import BackendScenarios, Engine
from tests.services.redis import RedisServer

require_sdk("taskiq", "taskiq_redis", venv_hint="pip install 'wove[taskiq]'")

from taskiq.message import BrokerMessage  # noqa: E402
from taskiq_redis import ListQueueBroker  # noqa: E402

import wove  # noqa: E402
from wove import (  # noqa: E402
    BackendUnavailableError,
    ConfigError,
    RunCancelledError,
    weave,
)
from wove.integrations.taskiq import TaskiqAdapter  # noqa: E402

pytestmark = pytest.mark.integration

DB = 11


class TaskiqEngine(Engine):
    """One ``taskiq worker`` (one child process, which runs the tasks) consuming its own queue."""

    holding_task = staticmethod(hold_async)

    def __init__(self, redis: RedisServer, log: Path) -> None:
        self.url = redis.url(DB)
        self.queue = f"wove-test-{uuid.uuid4().hex[:8]}"
        env = {"WOVE_TASKIQ_BROKER_URL": self.url, "WOVE_TASKIQ_QUEUE": self.queue}
        args = python_command("taskiq", "worker", "wove.integrations.taskiq_worker:broker", "--workers", "1")
        self.worker = WorkerProcess([*args, "--log-level", "INFO", "--shutdown-timeout", "1"], log, env)

    def configure(self, **executor_config: Any) -> None:
        config = {"broker_url": self.url, "queue_name": self.queue, **executor_config}
        wove.config(
            environments={
                "default": {"executor": "local"},
                "jobs": {"executor": "taskiq", "executor_config": config, "delivery_heartbeat_seconds": 1.5},
            }
        )

    def check_started(self, pids: list[int]) -> None:
        assert self.worker.pid not in pids  # the task ran in the worker's child process

    @contextlib.contextmanager
    def watch_carried(self) -> Iterator[list[int]]:
        sizes: list[int] = []

        class SpyBroker(ListQueueBroker):
            """Records the size of every message pushed to Redis."""

            async def kick(self, message: BrokerMessage) -> None:
                sizes.append(len(message.message))
                await super().kick(message)

        self.configure(broker=lambda: SpyBroker(self.url, queue_name=self.queue))
        yield sizes


@contextlib.contextmanager
def running_engine(redis: RedisServer, log: Path) -> Iterator[TaskiqEngine]:
    engine = TaskiqEngine(redis, log)
    try:
        yield engine
    finally:
        engine.worker.stop(timeout=3)


@pytest.fixture(scope="module")
def worker(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TaskiqEngine]:
    with running_engine(redis_server, tmp_path_factory.mktemp("taskiq") / "worker.log") as engine:
        yield engine


@pytest.fixture
def engine(worker: TaskiqEngine) -> TaskiqEngine:
    worker.configure()
    return worker


@pytest.fixture
def victim(redis_server: RedisServer, tmp_path: Path) -> Iterator[TaskiqEngine]:
    with running_engine(redis_server, tmp_path / "lone-worker.log") as engine:
        engine.configure()
        yield engine


class TestScenarios(BackendScenarios):
    """The shared scenarios on Taskiq."""


async def test_timeout_label_cancels_on_the_worker(engine: TaskiqEngine, tmp_path: Path) -> None:
    engine.configure(labels={"timeout": 0.3})
    with pytest.raises(RunCancelledError, match="backend cancelled"):
        async with weave(folder=str(tmp_path)) as w:
            w.do(environment="jobs")(hold_async)
    await wait_for_file(tmp_path / "cancelled-0", timeout=5)


def test_a_given_broker_is_used_and_left_running(engine: TaskiqEngine) -> None:
    broker = ListQueueBroker(engine.url, queue_name=engine.queue)
    engine.configure(broker=broker)
    with weave(a=2, b=3) as w:
        w.do(environment="jobs")(add)
    assert w.result.add == 5
    wove.shutdown()  # closes the connections wove opened in its loop; the broker stays usable

    async def still_usable() -> None:
        await broker.kick(BrokerMessage(task_id="t", task_name="none", message=b"{}", labels={"queue_name": "unused"}))
        await broker.connection_pool.disconnect()

    asyncio.run(still_usable())


async def test_a_broker_used_in_another_loop_is_refused_with_a_hint(engine: TaskiqEngine) -> None:
    broker = ListQueueBroker(engine.url, queue_name=engine.queue)
    await broker.kick(BrokerMessage(task_id="t", task_name="none", message=b"{}", labels={"queue_name": "unused"}))
    engine.configure(broker=broker)  # its pooled connection belongs to the test's loop
    try:
        with pytest.raises(BackendUnavailableError, match="another event loop"):
            async with weave(a=2, b=3) as w:
                w.do(environment="jobs")(add)
    finally:
        await broker.connection_pool.disconnect()


async def test_a_cancel_that_arrives_first_skips_the_run() -> None:
    from wove.integrations.taskiq_worker import cancel_run, run

    run_id = uuid.uuid4().hex
    assert cancel_run(run_id) is False  # nothing running under that id in this process: remembered
    with pytest.raises(asyncio.CancelledError):
        await run({"run_id": run_id, "callback_url": "http://127.0.0.1:1/never-called"})


def test_unreachable_broker_fails_the_weave_clearly() -> None:
    wove.config(
        environments={
            "default": {},
            "jobs": {"executor": "taskiq", "executor_config": {"broker_url": "redis://127.0.0.1:1/0"}},
        }
    )
    with pytest.raises(BackendUnavailableError, match="broker unavailable"), weave(a=1, b=2) as w:
        w.do(environment="jobs")(add)


@pytest.mark.parametrize(
    "config",
    [{"labels": ["timeout"]}, {"task_name": ""}, {"queue_name": 3}, {"broker": 42}],
    ids=["labels", "task_name", "queue_name", "broker"],
)
async def test_bad_configuration_is_a_config_error(config: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        adapter = TaskiqAdapter(name="jobs", config=config, callback_url="http://127.0.0.1:1", run_config={})
        await adapter.start()


def test_docs_example_runs(redis_server: RedisServer, tmp_path: Path) -> None:
    """docs/backends/taskiq.md as written: the shipped broker and the adapter's defaults, one Redis URL."""
    env = {"WOVE_TASKIQ_BROKER_URL": redis_server.url(DB + 1)}
    args = python_command("taskiq", "worker", "wove.integrations.taskiq_worker:broker", "--workers", "1")
    worker = WorkerProcess([*args, "--shutdown-timeout", "1"], tmp_path / "w.log", env)
    try:
        out = run_doc_example(ROOT / "docs" / "backends" / "taskiq.md", '"executor": "taskiq"', env, tmp_path).stdout
    finally:
        worker.stop(timeout=3)
    assert "total 15.0 priced by worker {" in out
