"""Weaves whose tasks run on real ARQ workers (``arq wove.integrations.arq_worker.WorkerSettings``) over a real
Redis, end to end. ARQ pins ``redis<6``, so this module runs in its own environment:
``.venv-arq/bin/python -m pytest tests/integration/test_arq.py``."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Iterator
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

require_sdk("arq", venv_hint="run this module with .venv-arq/bin/python -m pytest (scripts/test does)")

from arq.connections import ArqRedis, RedisSettings, create_pool  # noqa: E402
from arq.jobs import Job  # noqa: E402

import wove  # noqa: E402
from wove import BackendUnavailableError, ConfigError, DeliveryLostError, SubmitError, weave  # noqa: E402
from wove.integrations.arq import ArqAdapter  # noqa: E402

pytestmark = pytest.mark.integration

DB = 12


class Worker:
    """One ``arq`` worker process consuming its own queue."""

    def __init__(self, redis: RedisServer, log: Path) -> None:
        self.url = redis.url(DB)
        self.queue = f"arq:wove-test-{uuid.uuid4().hex[:8]}"
        env = {"WOVE_ARQ_REDIS_URL": self.url, "WOVE_ARQ_QUEUE": self.queue}
        self.process = WorkerProcess(python_command("arq", "wove.integrations.arq_worker.WorkerSettings"), log, env)

    def configure(self, **executor_config: Any) -> None:
        config = {"redis_settings": self.url, "queue_name": self.queue, **executor_config}
        wove.config(
            environments={
                "default": {"executor": "local"},
                "jobs": {"executor": "arq", "executor_config": config, "delivery_heartbeat_seconds": 1.5},
            }
        )


def start_worker(redis: RedisServer, log: Path) -> Iterator[Worker]:
    worker = Worker(redis, log)
    try:
        yield worker
    finally:
        worker.process.stop(timeout=5)


@pytest.fixture(scope="module")
def worker(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    yield from start_worker(redis_server, tmp_path_factory.mktemp("arq") / "worker.log")


@pytest.fixture
def jobs(worker: Worker) -> Worker:
    worker.configure()
    return worker


@pytest.fixture
async def redis(worker: Worker) -> AsyncIterator[ArqRedis]:
    """A client in the test's own loop, to look at what ARQ stored."""
    pool = await create_pool(RedisSettings.from_dsn(worker.url))
    try:
        yield pool
    finally:
        await pool.aclose()


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
    assert {pid for _, pid in w.result.doubled} == {jobs.process.pid}
    records = w.result.records["doubled"]
    assert [r.item for r in records] == list(range(20))
    assert all(r.status == "succeeded" and r.submitted_at <= r.started_at <= r.finished_at for r in records)  # type: ignore[operator]


def test_remote_exception_keeps_its_type(jobs: Worker) -> None:
    with pytest.raises(InventoryError, match="sku-9 is out of stock"), weave(sku="sku-9") as w:
        w.do(environment="jobs")(out_of_stock)


@pytest.mark.parametrize("abort_timeout", [0, 5], ids=["request", "confirm"])
async def test_cancelling_the_weave_aborts_the_running_job(
    jobs: Worker, redis: ArqRedis, tmp_path: Path, abort_timeout: float
) -> None:
    jobs.configure(abort_timeout=abort_timeout)
    marker, job_id = tmp_path / "nap", f"cancel-{uuid.uuid4().hex}"

    async def run() -> None:
        async with weave(marker=str(marker), seconds=30, delivery_idempotency_key=job_id) as w:
            w.do(environment="jobs")(nap_async)

    running = asyncio.ensure_future(run())
    await wait_for_file(Path(f"{marker}.started"))
    began = time.monotonic()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert time.monotonic() - began < 2
    await wait_for_file(Path(f"{marker}.cancelled"), timeout=5)  # the coroutine on the worker was cancelled
    job = Job(job_id, redis, _queue_name=jobs.queue)
    if abort_timeout:  # the weave's cancel waited for the worker to confirm the abort
        assert await job.result_info() is not None
    for _ in range(100):  # ARQ writes the aborted job's result just after cancelling it
        info = await job.result_info()
        if info is not None:
            break
        await asyncio.sleep(0.02)
    assert info is not None and not info.success and isinstance(info.result, asyncio.CancelledError)
    assert not Path(f"{marker}.finished").exists()


def test_idempotency_key_is_the_job_id_and_refuses_a_second_run(jobs: Worker) -> None:
    key = f"order-{uuid.uuid4().hex}"
    with weave(a=1, b=2, delivery_idempotency_key=key) as w:
        w.do(environment="jobs")(add)
    assert w.result.add == 3
    assert w.result.records["add"][0].submission == f"arq job {key} on {jobs.queue}"
    with pytest.raises(SubmitError, match="idempotency key"), weave(a=1, b=2, delivery_idempotency_key=key) as w:
        w.do(environment="jobs")(add)


def test_enqueue_options_reach_arq(jobs: Worker) -> None:
    jobs.configure(enqueue_options={"_defer_by": 0.4})
    with weave(a=1, b=2) as w:
        w.do(environment="jobs")(add)
    wait = w.result.records["add"][0].queue_wait
    assert wait is not None and wait >= 0.35


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
    assert pid == lone_worker.process.pid
    began = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(DeliveryLostError):
        await asyncio.wait_for(running, 10)
    assert time.monotonic() - began < 4  # heartbeat window 1.5 s


async def test_large_argument_goes_by_reference(jobs: Worker, redis: ArqRedis) -> None:
    blob, key = os.urandom(1 << 20), f"blob-{uuid.uuid4().hex}"
    async with weave(blob=blob, delivery_idempotency_key=key) as w:
        w.do(environment="jobs")(size_of)
    assert w.result.size_of == len(blob)
    stored = 0
    for _ in range(100):  # ARQ writes the result (holding the job's arguments) just after the weave got its value
        stored = await redis.strlen(f"arq:result:{key}")
        if stored:
            break
        await asyncio.sleep(0.02)
    assert 0 < stored < 8 * 1024  # the megabyte stayed on the callback server


def test_pool_from_a_factory(jobs: Worker) -> None:
    settings = RedisSettings.from_dsn(jobs.url)
    jobs.configure(pool=lambda: create_pool(settings), redis_settings=None)
    with weave(a=2, b=3) as w:
        w.do(environment="jobs")(add)
    assert w.result.add == 5


def test_a_given_pool_is_used_and_left_usable(jobs: Worker) -> None:
    settings = RedisSettings.from_dsn(jobs.url)
    pool = ArqRedis(host=settings.host, port=settings.port, db=settings.database)  # not connected yet
    jobs.configure(pool=pool, redis_settings=None)
    with weave(a=2, b=3) as w:
        w.do(environment="jobs")(add)
    assert w.result.add == 5
    wove.shutdown()  # closes the connections wove opened in its loop; the pool stays usable

    async def still_usable() -> None:
        assert await pool.ping()
        await pool.aclose()

    asyncio.run(still_usable())


async def test_pool_opened_in_another_loop_is_refused_with_a_hint(jobs: Worker, redis: ArqRedis) -> None:
    jobs.configure(pool=redis)  # connected in the test's loop; wove runs it in its runtime thread's loop
    with pytest.raises(BackendUnavailableError, match="another event loop"):
        async with weave(a=2, b=3) as w:
            w.do(environment="jobs")(add)


def test_round_trip_latency(jobs: Worker) -> None:
    timings = []
    for i in range(40):
        began = time.perf_counter()
        with weave(a=i, b=1) as w:
            w.do(environment="jobs")(add)
        timings.append(time.perf_counter() - began)
        assert w.result.add == i + 1
    median = statistics.median(timings[5:])
    print(f"arq weave with one remote task: median {median * 1e3:.2f} ms")
    assert median < 0.25  # generous for loaded CI machines; a few ms on an idle one


def test_unreachable_redis_fails_the_weave_clearly() -> None:
    settings = {"host": "127.0.0.1", "port": 1, "conn_retries": 0}
    wove.config(
        environments={"default": {}, "jobs": {"executor": "arq", "executor_config": {"redis_settings": settings}}}
    )
    with pytest.raises(BackendUnavailableError, match="cannot reach Redis"), weave(a=1, b=2) as w:
        w.do(environment="jobs")(add)


@pytest.mark.parametrize(
    "config",
    [
        {"enqueue_options": {"defer_by": 1}},
        {"enqueue_options": {"_job_id": "fixed"}},
        {"queue_name": ""},
        {"abort_timeout": -1},
        {"redis_settings": {"hots": "typo"}},
        {"pool": 42},
    ],
    ids=["option-without-underscore", "reserved-option", "queue_name", "abort_timeout", "redis_settings", "pool"],
)
async def test_bad_configuration_is_a_config_error(config: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        adapter = ArqAdapter(name="jobs", config=config, callback_url="http://127.0.0.1:1", run_config={})
        await adapter.start()


def test_docs_example_runs(redis_server: RedisServer, tmp_path: Path) -> None:
    """docs/backends/arq.md as written: the shipped WorkerSettings and the adapter's defaults, one Redis URL."""
    env = {"WOVE_ARQ_REDIS_URL": redis_server.url(DB + 1)}
    worker = WorkerProcess(
        python_command("arq", "wove.integrations.arq_worker.WorkerSettings"), tmp_path / "w.log", env
    )
    try:
        out = run_doc_example(ROOT / "docs" / "backends" / "arq.md", '"executor": "arq"', env, tmp_path)
    finally:
        worker.stop(timeout=5)
    assert f"total 15.0 priced by worker {{{worker.pid}}}" in out
    assert "on arq:wove" in out
