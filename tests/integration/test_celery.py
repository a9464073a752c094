"""The ``celery`` backend against real Celery prefork workers and a real Redis broker.

Workers are ``python -m celery -A wove.integrations.celery_worker worker`` subprocesses (the documented command), run
from the repository root so they import this module's task functions. Each scenario that kills or reconfigures a
worker gets a worker, a queue and a Redis database of its own.
"""

from __future__ import annotations

import asyncio
import json
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
from pathlib import Path
from typing import Any

import celery  # a missing Celery fails this module, in CI and locally
import psutil  # type: ignore[import-untyped]
import pytest
from celery.signals import after_task_publish
from redis import Redis

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
from wove.errors import BackendUnavailableError, ConfigError, DeliveryLostError
from wove.integrations import get_adapter_class
from wove.integrations.celery import TASK_NAME, CeleryAdapter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

#: Redis databases of this module: the shared worker, the killed workers, the redelivery workers.
MAIN_DB, KILL_DB, REDELIVERY_DB = 4, 5, 6
HEARTBEAT = 2.0


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


def start_worker(
    log_dir: Path,
    broker: str,
    queue: str,
    *,
    app: str = "wove.integrations.celery_worker",
    concurrency: int = 2,
    pool: str = "prefork",
    env: dict[str, str] | None = None,
) -> ManagedProcess:
    """A worker (prefork unless told) consuming ``queue``, started as the docs say, ready when it logs so."""
    name = f"{queue.split(',')[0]}-{uuid.uuid4().hex[:6]}"
    command = [sys.executable, "-m", "celery", "-A", app, "worker", "-P", pool, "-c", str(concurrency)]
    command += ["-Q", queue, "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    command += ["--loglevel=INFO"]
    log = log_dir / f"{name}.log"
    worker = ManagedProcess(command, log, env=worker_env(WOVE_CELERY_BROKER_URL=broker, **(env or {})), cwd=ROOT)
    try:
        wait_until(lambda: " ready." in worker.output() or not worker.alive(), 60, f"celery worker {name}", log)
        assert worker.alive(), worker.output()
    except BaseException:
        stop_group(worker)
        raise
    return worker


@dataclass
class Worker:
    """A running worker and where it takes work from."""

    process: ManagedProcess
    broker: str
    queue: str

    def output(self) -> str:
        return self.process.output()

    def children(self) -> set[int]:
        return {child.pid for child in psutil.Process(self.process.pid).children()}

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"broker_url": self.broker, "queue": self.queue, **extra}


def configure(broker: str, queue: str, **executor_config: Any) -> None:
    config = {"broker_url": broker, "queue": queue, **executor_config}
    wove.config(
        environments={
            "default": {},
            "jobs": {"executor": "celery", "executor_config": config, "delivery_heartbeat_seconds": HEARTBEAT},
        }
    )


@pytest.fixture(scope="module")
def main_worker(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    broker, queue = redis_server.url(MAIN_DB), "wove-test-main"
    process = start_worker(tmp_path_factory.mktemp("celery"), broker, f"{queue},wove")  # "wove": the docs example
    yield Worker(process, broker, queue)
    stop_group(process)


@pytest.fixture
def jobs(main_worker: Worker) -> Worker:
    """The ``jobs`` environment on the shared worker."""
    configure(main_worker.broker, main_worker.queue)
    return main_worker


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
    assert value == 22
    assert pid in jobs.children()  # a prefork pool child of the worker
    (record,) = w.result.records["remote"]
    assert record.status == "succeeded" and record.pid == pid and record.environment == "jobs"
    succeeded = f"{TASK_NAME}[{record.run_id}] succeeded"  # the run id is the Celery task id
    wait_for(lambda: succeeded in jobs.output(), 10, "celery logs the task by the run id")
    assert record.submitted_at is not None and record.started_at is not None and record.finished_at is not None
    assert record.submitted_at <= record.started_at <= record.finished_at


def test_remote_task_mapped_over_20_items(jobs: Worker) -> None:
    with weave(items=list(range(20))) as w:

        @w.do("items", environment="jobs")
        def squared(item: int) -> tuple[int, int]:
            return item * item, where()[1]

    assert [value for value, _ in w.result.squared] == [i * i for i in range(20)]
    assert {pid for _, pid in w.result.squared} <= jobs.children()


def test_remote_exception_keeps_its_type(jobs: Worker) -> None:
    with pytest.raises(CustomError, match="bad input"), weave() as w:

        @w.do(environment="jobs")
        def broken() -> None:
            fail("bad input")

    assert w.result.records["broken"][0].status == "failed"
    wait_for(lambda: "raised unexpected: CustomError" in jobs.output(), 10, "celery records the task as failed")


async def test_cancelling_the_weave_kills_the_running_task(jobs: Worker, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    async def run() -> None:
        async with weave() as w:

            @w.do(environment="jobs")
            def sleepy() -> str:
                return nap(60, str(pid_file))

    running = asyncio.ensure_future(run())
    await await_for(lambda: read_pid(pid_file) is not None, 20, "the task started")
    pid = read_pid(pid_file)
    assert pid is not None and pid in jobs.children()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 10)
    await await_for(lambda: gone(pid), 10, f"pool child {pid} was killed")  # revoke(terminate=True, SIGKILL)
    await await_for(lambda: len(jobs.children()) == 2, 10, "celery replaced the pool child")
    await asyncio.to_thread(test_local_and_remote_tasks, jobs)  # the worker carries on


async def test_cancelled_queued_task_never_runs(jobs: Worker, tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    driver = await Driver.start(CeleryAdapter, "celery", jobs.config())
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
        wait_for(lambda: f"Discarding revoked task: {TASK_NAME}[{queued}]" in jobs.output(), 10, "worker discarded it")
    finally:
        await driver.close()


@pytest.mark.parametrize("victim", ["pool child", "whole worker"])
def test_killed_worker_is_reported_lost(
    victim: str, redis_server: RedisServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    queue = f"wove-test-kill-{uuid.uuid4().hex[:6]}"
    worker = start_worker(tmp_path, redis_server.url(KILL_DB), queue)
    request.addfinalizer(lambda: stop_group(worker))
    configure(redis_server.url(KILL_DB), queue)
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
    if victim == "pool child":
        os.kill(pid, signal.SIGKILL)
    else:
        kill_group(worker)
    thread.join(HEARTBEAT + 8)
    assert not thread.is_alive(), "the weave hung after its worker died"
    assert isinstance(outcome.get("error"), DeliveryLostError), outcome
    assert outcome["at"] - killed_at < HEARTBEAT + 2.0  # within the heartbeat window, not a timeout


def test_warm_shutdown_of_a_solo_worker_lets_the_run_finish(redis_server: RedisServer, tmp_path: Path) -> None:
    """The solo pool runs tasks in the main thread, where SIGTERM means "finish, then stop", not cancel."""
    queue = f"wove-test-solo-{uuid.uuid4().hex[:6]}"
    worker = start_worker(tmp_path, redis_server.url(KILL_DB), queue, pool="solo", concurrency=1)
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
        stop_group(worker)


def test_oversized_argument_goes_by_reference(jobs: Worker) -> None:
    published: list[int] = []

    def measure(body: Any = None, **_: Any) -> None:
        published.append(len(json.dumps(body)))

    after_task_publish.connect(measure, weak=False)
    try:
        blob = os.urandom(1 << 20)
        with weave(blob=blob) as w:

            @w.do(environment="jobs")
            def measured(blob: bytes) -> int:
                return size_of(blob)

    finally:
        after_task_publish.disconnect(measure)
    assert w.result.measured == len(blob)
    assert len(published) == 1 and published[0] < 8 * 1024, published  # the megabyte never touched the broker


# -- duplicate deliveries ------------------------------------------------------------------------------------------


def test_redelivery_after_the_result_resolves_the_run_once(redis_server: RedisServer, tmp_path: Path) -> None:
    """acks_late: the worker dies after posting the result, before acknowledging; another worker gets the message."""
    broker, queue = redis_server.url(REDELIVERY_DB), f"wove-test-redelivery-{uuid.uuid4().hex[:6]}"
    app = "tests.integration.celery_redelivery_app"
    marker, runs = tmp_path / "died", tmp_path / "runs"
    dying = {"TEST_BROKER_URL": broker, "TEST_DIE_AFTER_RESULT": str(marker)}
    first = start_worker(tmp_path, broker, queue, app=app, env=dying)
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
        stop_group(first)
    second = start_worker(tmp_path, broker, queue, app=app, env={"TEST_BROKER_URL": broker})
    try:
        skipped = f"run {record.run_id} of task 'once' is no longer pending"
        wait_for(lambda: skipped in second.output(), 20, "the message was redelivered")
        wait_for(lambda: f"{TASK_NAME}[{record.run_id}] succeeded" in second.output(), 10, "the copy ended quietly")
        wait_for(lambda: client.hlen("unacked") == 0, 10, "the copy was acknowledged")
        assert count_lines(runs) == 1  # the task body ran once: the copy stopped before it
    finally:
        stop_group(second)


async def test_concurrent_copies_resolve_the_run_once(jobs: Worker, tmp_path: Path) -> None:
    """Two deliveries of one payload run at once; the first result wins and the second is taken as delivered."""
    runs = tmp_path / "runs"
    copies: list[str] = []

    class TwiceDelivered(CeleryAdapter):
        async def submit(self, payload: Any, frame: Any) -> str:
            submission = await super().submit(payload, frame)
            copy_id = f"{frame['run_id']}-copy"
            await self.run_blocking(self.app.send_task, TASK_NAME, args=(payload,), task_id=copy_id, queue=self.queue)
            copies.append(copy_id)
            return submission

    driver = await Driver.start(TwiceDelivered, "celery", jobs.config())
    try:
        run_id = await driver.submit(tally, path=str(runs), value=5, seconds=0.5, delivery={"heartbeat_seconds": 0.6})
        assert (await driver.outcome(run_id))["result"] == 5
        await await_for(lambda: f"{TASK_NAME}[{copies[0]}] succeeded" in jobs.output(), 10, "the copy succeeded")
        await asyncio.sleep(0.3)
    finally:
        await driver.close()
    assert count_lines(runs) == 2  # both copies ran (at least once) ...
    kinds = driver.kinds(run_id)
    assert kinds.count("task_result") == 1 and kinds[-1] == "task_result"  # ... and the run resolved once
    assert f"{TASK_NAME}[{copies[0]}] raised" not in jobs.output()


# -- configuration -----------------------------------------------------------------------------------------------------


def test_docs_example_runs(jobs: Worker, tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "backends" / "celery.md").read_text(), flags=re.S)
    script = tmp_path / "example.py"
    script.write_text(next(block for block in blocks if "wove.config" in block))
    env = {**os.environ, "WOVE_CELERY_BROKER_URL": jobs.broker}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "total 15.0 priced by pool children" in done.stdout and "succeeded" in done.stdout


def test_registered_under_its_name() -> None:
    assert get_adapter_class("celery") is CeleryAdapter
    assert "wove[celery]" in CeleryAdapter.install_hint


def test_an_existing_app_object(jobs: Worker) -> None:
    app = celery.Celery("mine", broker=jobs.broker, set_as_current=False)
    config = {"app": app, "queue": jobs.queue, "send_task_options": {"priority": 3}}
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
