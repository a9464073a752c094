"""Weaves whose tasks run on real Taskiq workers (``taskiq worker wove.integrations.taskiq_worker:broker``) over a
real Redis, end to end: the adapter, the shipped worker broker, the callback server and the runtime's policies."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration._redis_queues import (
    ROOT,
    InventoryError,
    WorkerProcess,
    add,
    double,
    nap,
    nap_async,
    out_of_stock,
    python_command,
    require_sdk,
    run_doc_example,
    size_of,
    wait_for_file,
)
from tests.services.redis import RedisServer

require_sdk("taskiq", "taskiq_redis", venv_hint="pip install 'wove[taskiq]'")

from taskiq.message import BrokerMessage  # noqa: E402
from taskiq_redis import ListQueueBroker  # noqa: E402

import wove  # noqa: E402
from wove import (  # noqa: E402
    BackendUnavailableError,
    ConfigError,
    DeliveryLostError,
    RunCancelledError,
    weave,
)
from wove.integrations.taskiq import TaskiqAdapter  # noqa: E402

pytestmark = pytest.mark.integration

DB = 11


class Worker:
    """One ``taskiq worker`` (one child process) consuming its own queue."""

    def __init__(self, redis: RedisServer, log: Path) -> None:
        self.url = redis.url(DB)
        self.queue = f"wove-test-{uuid.uuid4().hex[:8]}"
        env = {"WOVE_TASKIQ_BROKER_URL": self.url, "WOVE_TASKIQ_QUEUE": self.queue}
        args = python_command("taskiq", "worker", "wove.integrations.taskiq_worker:broker", "--workers", "1")
        self.process = WorkerProcess([*args, "--log-level", "INFO", "--shutdown-timeout", "1"], log, env)

    def configure(self, **executor_config: Any) -> None:
        config = {"broker_url": self.url, "queue_name": self.queue, **executor_config}
        wove.config(
            environments={
                "default": {"executor": "local"},
                "jobs": {"executor": "taskiq", "executor_config": config, "delivery_heartbeat_seconds": 1.5},
            }
        )


def start_worker(redis: RedisServer, log: Path) -> Iterator[Worker]:
    worker = Worker(redis, log)
    try:
        yield worker
    finally:
        worker.process.stop(timeout=3)


@pytest.fixture(scope="module")
def worker(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    yield from start_worker(redis_server, tmp_path_factory.mktemp("taskiq") / "worker.log")


@pytest.fixture
def jobs(worker: Worker) -> Worker:
    worker.configure()
    return worker


def test_local_remote_and_mapped_tasks(jobs: Worker) -> None:
    with weave(n=20) as w:

        @w.do
        def items(n: int) -> list[int]:
            return list(range(n))

        @w.do(environment="jobs")
        def total(items: list[int]) -> int:
            return add(sum(items), 1)

        @w.do("items", environment="jobs")
        def doubled(item: int) -> tuple[int, int]:
            return double(item)

        @w.do
        def report(total: int, doubled: list[tuple[int, int]]) -> tuple[int, list[int]]:
            return total, [value for value, _ in doubled]

    assert w.result.report == (191, [2 * i for i in range(20)])
    assert os.getpid() not in {pid for _, pid in w.result.doubled}
    records = w.result.records["doubled"]
    assert [r.item for r in records] == list(range(20))
    assert all(r.status == "succeeded" and r.submitted_at <= r.started_at <= r.finished_at for r in records)  # type: ignore[operator]


def test_remote_exception_keeps_its_type(jobs: Worker) -> None:
    with pytest.raises(InventoryError, match="sku-9 is out of stock"), weave(sku="sku-9") as w:
        w.do(environment="jobs")(out_of_stock)


async def test_cancelling_the_weave_cancels_the_running_task(jobs: Worker, tmp_path: Path) -> None:
    marker = tmp_path / "nap"

    async def run() -> None:
        async with weave(marker=str(marker), seconds=30) as w:
            w.do(environment="jobs")(nap_async)

    running = asyncio.ensure_future(run())
    await wait_for_file(Path(f"{marker}.started"))
    began = time.monotonic()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert time.monotonic() - began < 2
    await wait_for_file(Path(f"{marker}.cancelled"), timeout=5)  # the coroutine on the worker was cancelled
    assert not Path(f"{marker}.finished").exists()


async def test_timeout_label_cancels_on_the_worker(jobs: Worker, tmp_path: Path) -> None:
    jobs.configure(labels={"timeout": 0.3})
    with pytest.raises(RunCancelledError, match="backend cancelled"):
        async with weave(marker=str(tmp_path / "nap"), seconds=30) as w:
            w.do(environment="jobs")(nap_async)
    await wait_for_file(Path(f"{tmp_path / 'nap'}.cancelled"), timeout=5)


@pytest.fixture
def lone_worker(redis_server: RedisServer, tmp_path: Path) -> Iterator[Worker]:
    yield from start_worker(redis_server, tmp_path / "lone-worker.log")


async def test_killed_worker_is_lost_within_the_heartbeat_window(lone_worker: Worker, tmp_path: Path) -> None:
    lone_worker.configure()
    marker = tmp_path / "nap"

    async def run() -> None:
        async with weave(marker=str(marker), seconds=30) as w:
            w.do(environment="jobs")(nap)

    running = asyncio.ensure_future(run())
    pid = int(await wait_for_file(Path(f"{marker}.started")))
    assert pid != lone_worker.process.pid  # the task ran in the worker's child process
    began = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(DeliveryLostError):
        await asyncio.wait_for(running, 10)
    assert time.monotonic() - began < 4  # heartbeat window 1.5 s


class SpyBroker(ListQueueBroker):
    """Records the size of every message pushed to Redis."""

    sizes: list[int] = []  # noqa: RUF012

    async def kick(self, message: BrokerMessage) -> None:
        self.sizes.append(len(message.message))
        await super().kick(message)


def test_large_argument_goes_by_reference(jobs: Worker) -> None:
    jobs.configure(broker=lambda: SpyBroker(jobs.url, queue_name=jobs.queue))
    blob = os.urandom(1 << 20)
    with weave(blob=blob) as w:
        w.do(environment="jobs")(size_of)
    assert w.result.size_of == len(blob)
    assert SpyBroker.sizes and max(SpyBroker.sizes) < 8 * 1024  # the megabyte stayed on the callback server


def test_a_given_broker_is_used_and_left_running(jobs: Worker) -> None:
    broker = ListQueueBroker(jobs.url, queue_name=jobs.queue)
    jobs.configure(broker=broker)
    with weave(a=2, b=3) as w:
        w.do(environment="jobs")(add)
    assert w.result.add == 5
    wove.shutdown()  # closes the connections wove opened in its loop; the broker stays usable

    async def still_usable() -> None:
        await broker.kick(BrokerMessage(task_id="t", task_name="none", message=b"{}", labels={"queue_name": "unused"}))
        await broker.connection_pool.disconnect()

    asyncio.run(still_usable())


async def test_a_broker_used_in_another_loop_is_refused_with_a_hint(jobs: Worker) -> None:
    broker = ListQueueBroker(jobs.url, queue_name=jobs.queue)
    await broker.kick(BrokerMessage(task_id="t", task_name="none", message=b"{}", labels={"queue_name": "unused"}))
    jobs.configure(broker=broker)  # its pooled connection belongs to the test's loop
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


def test_round_trip_latency(jobs: Worker) -> None:
    timings = []
    for i in range(40):
        began = time.perf_counter()
        with weave(a=i, b=1) as w:
            w.do(environment="jobs")(add)
        timings.append(time.perf_counter() - began)
        assert w.result.add == i + 1
    median = statistics.median(timings[5:])
    print(f"taskiq weave with one remote task: median {median * 1e3:.2f} ms")
    assert median < 0.25  # generous for loaded CI machines; about 5 ms on an idle one


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
        out = run_doc_example(ROOT / "docs" / "backends" / "taskiq.md", '"executor": "taskiq"', env, tmp_path)
    finally:
        worker.stop(timeout=3)
    assert "total 15.0 priced by worker {" in out
