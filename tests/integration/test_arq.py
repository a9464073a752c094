"""Weaves whose tasks run on real ARQ workers (``arq wove.integrations.arq_worker.WorkerSettings``) over a real
Redis, end to end. ARQ pins ``redis<6``, so this module runs in its own environment:
``.venv-arq/bin/python -m pytest tests/integration/test_arq.py``."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.queue_support import ROOT, WorkerProcess, python_command, require_sdk, run_doc_example
from tests.integration.remote_tasks import add, hold_async
from tests.integration.scenarios import BackendScenarios, Engine
from tests.services.redis import RedisServer
from wove.result import RunRecord

require_sdk("arq", venv_hint="run this module with .venv-arq/bin/python -m pytest (scripts/test does)")

from arq.connections import ArqRedis, RedisSettings, create_pool  # noqa: E402
from arq.jobs import Job  # noqa: E402

import wove  # noqa: E402
from wove import BackendUnavailableError, ConfigError, SubmitError, weave  # noqa: E402
from wove.integrations.arq import ArqAdapter  # noqa: E402

pytestmark = pytest.mark.integration

DB = 12


class ArqEngine(Engine):
    """One ``arq`` worker process consuming its own queue; it runs jobs in its own process."""

    holding_task = staticmethod(hold_async)

    def __init__(self, redis: RedisServer, log: Path) -> None:
        self.url = redis.url(DB)
        self.queue = f"arq:wove-test-{uuid.uuid4().hex[:8]}"
        env = {"WOVE_ARQ_REDIS_URL": self.url, "WOVE_ARQ_QUEUE": self.queue}
        self.worker = WorkerProcess(python_command("arq", "wove.integrations.arq_worker.WorkerSettings"), log, env)
        self.abort_timeout: float | None = None

    def configure(self, **executor_config: Any) -> None:
        config = {"redis_settings": self.url, "queue_name": self.queue, **executor_config}
        self.abort_timeout = executor_config.get("abort_timeout")
        wove.config(
            environments={
                "default": {"executor": "local"},
                "jobs": {"executor": "arq", "executor_config": config, "delivery_heartbeat_seconds": 1.5},
            }
        )

    def check_ran(self, record: RunRecord, pid: int) -> None:
        assert pid == self.worker.pid

    def check_mapped(self, records: list[RunRecord], pids: set[int]) -> None:
        assert pids == {self.worker.pid}

    def check_started(self, pids: list[int]) -> None:
        assert set(pids) == {self.worker.pid}

    async def saw_cancel(self, records: list[RunRecord], pids: list[int]) -> None:
        async with self.client() as redis:
            for record in records:
                job = Job(job_id(record), redis, _queue_name=self.queue)
                if self.abort_timeout:  # the weave's cancel waited for the worker to confirm the abort
                    assert await job.result_info() is not None
                info = await poll(job.result_info)  # ARQ writes the aborted job's result just after cancelling it
                assert info is not None and not info.success and isinstance(info.result, asyncio.CancelledError)

    async def carried_after(self, record: RunRecord, carried: list[int]) -> None:
        async with self.client() as redis:  # ARQ keeps the job's arguments with its result
            stored = await poll(lambda: redis.strlen(f"arq:result:{job_id(record)}"))
        if stored:
            carried.append(stored)

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[ArqRedis]:
        """A client in the test's own loop, to look at what ARQ stored."""
        pool = await create_pool(RedisSettings.from_dsn(self.url))
        try:
            yield pool
        finally:
            await pool.aclose()


def job_id(record: RunRecord) -> str:
    return str(record.submission).split()[2]  # "arq job <id> on <queue>"


async def poll(read: Any, attempts: int = 100) -> Any:
    """What ``read()`` gives once it gives something (ARQ writes results just after the weave got its value)."""
    for _ in range(attempts):
        value = await read()
        if value:
            return value
        await asyncio.sleep(0.02)
    return None


@contextlib.contextmanager
def running_engine(redis: RedisServer, log: Path) -> Iterator[ArqEngine]:
    engine = ArqEngine(redis, log)
    try:
        yield engine
    finally:
        engine.worker.stop(timeout=5)


@pytest.fixture(scope="module")
def worker(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArqEngine]:
    with running_engine(redis_server, tmp_path_factory.mktemp("arq") / "worker.log") as engine:
        yield engine


@pytest.fixture
def engine(worker: ArqEngine) -> ArqEngine:
    worker.configure()
    return worker


@pytest.fixture
def victim(redis_server: RedisServer, tmp_path: Path) -> Iterator[ArqEngine]:
    with running_engine(redis_server, tmp_path / "lone-worker.log") as engine:
        engine.configure()
        yield engine


@pytest.fixture
async def redis(worker: ArqEngine) -> AsyncIterator[ArqRedis]:
    """A client in the test's own loop, to look at what ARQ stored."""
    async with worker.client() as pool:
        yield pool


class TestScenarios(BackendScenarios):
    """The shared scenarios on ARQ."""

    @pytest.fixture(params=[0, 5], ids=["request", "confirm"])
    def cancelling(self, engine: ArqEngine, request: pytest.FixtureRequest) -> ArqEngine:
        """Cancel without waiting for the worker (``abort_timeout=0``), or waiting for it to confirm the abort."""
        engine.configure(abort_timeout=request.param)
        return engine


def test_idempotency_key_is_the_job_id_and_refuses_a_second_run(engine: ArqEngine) -> None:
    key = f"order-{uuid.uuid4().hex}"
    with weave(a=1, b=2, delivery_idempotency_key=key) as w:
        w.do(environment="jobs")(add)
    assert w.result.add == 3
    assert w.result.records["add"][0].submission == f"arq job {key} on {engine.queue}"
    with pytest.raises(SubmitError, match="idempotency key"), weave(a=1, b=2, delivery_idempotency_key=key) as w:
        w.do(environment="jobs")(add)


def test_enqueue_options_reach_arq(engine: ArqEngine) -> None:
    engine.configure(enqueue_options={"_defer_by": 0.4})
    with weave(a=1, b=2) as w:
        w.do(environment="jobs")(add)
    wait = w.result.records["add"][0].queue_wait
    assert wait is not None and wait >= 0.35


def test_pool_from_a_factory(engine: ArqEngine) -> None:
    settings = RedisSettings.from_dsn(engine.url)
    engine.configure(pool=lambda: create_pool(settings), redis_settings=None)
    with weave(a=2, b=3) as w:
        w.do(environment="jobs")(add)
    assert w.result.add == 5


def test_a_given_pool_is_used_and_left_usable(engine: ArqEngine) -> None:
    settings = RedisSettings.from_dsn(engine.url)
    pool = ArqRedis(host=settings.host, port=settings.port, db=settings.database)  # not connected yet
    engine.configure(pool=pool, redis_settings=None)
    with weave(a=2, b=3) as w:
        w.do(environment="jobs")(add)
    assert w.result.add == 5
    wove.shutdown()  # closes the connections wove opened in its loop; the pool stays usable

    async def still_usable() -> None:
        assert await pool.ping()
        await pool.aclose()

    asyncio.run(still_usable())


async def test_pool_opened_in_another_loop_is_refused_with_a_hint(engine: ArqEngine, redis: ArqRedis) -> None:
    engine.configure(pool=redis)  # connected in the test's loop; wove runs it in its runtime thread's loop
    with pytest.raises(BackendUnavailableError, match="another event loop"):
        async with weave(a=2, b=3) as w:
            w.do(environment="jobs")(add)


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
        out = run_doc_example(ROOT / "docs" / "backends" / "arq.md", '"executor": "arq"', env, tmp_path).stdout
    finally:
        worker.stop(timeout=5)
    assert f"total 15.0 priced by worker {{{worker.pid}}}" in out
    assert "on arq:wove" in out
