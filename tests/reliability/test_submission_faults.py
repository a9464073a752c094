"""The backend refuses or fails a submission: a job API answering 500, a Celery broker that is down, ``sbatch``
refusing.

What must hold: the error names the environment and carries the backend's own message; ``retries`` apply (each
attempt is a new submission, counted where the backend sees it); the weave never waits for a run that was never
submitted (``delivery_timeout`` is far away in every test, so a wait would show as the test's timeout), and nothing
stays pending afterwards. Each test records how many attempts the backend saw and how long the weave took to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
from aiohttp import web

import wove
from tests.integration.queue_support import ROOT
from tests.reliability.support import NEVER, SentFrames, record, start_celery, unique_queue
from tests.reliability.tasks import add
from tests.services.base import port_open, wait_until
from tests.services.redis import RedisServer
from tests.services.slurm import SlurmCluster
from wove import weave
from wove._types import Frame
from wove.environment import EnvironmentExecutor, get_runtime
from wove.environment.remote import BackendAdapterEnvironmentExecutor
from wove.errors import BackendUnavailableError, SubmitError
from wove.integrations.base import BackendAdapter
from wove.integrations.worker import arun

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: Redis database of the broker-outage test's own Redis server.
BROKER_DB = 0


def configure(executor: Any, executor_config: dict[str, Any], **settings: Any) -> None:
    jobs = {"executor": executor, "executor_config": executor_config, "delivery_timeout": NEVER, **settings}
    wove.config(environments={"default": {"executor": "local"}, "jobs": jobs})


def run_remote(**inputs: Any) -> tuple[Any, BaseException | None, float]:
    """Run ``add`` in ``jobs``; (the weave, its error, seconds it took)."""
    began = time.monotonic()
    error: BaseException | None = None
    w: Any = None
    try:
        with weave(a=1, b=2, **inputs) as w:
            w.do(environment="jobs")(add)
    except Exception as exc:
        error = exc
    return w, error, time.monotonic() - began


def nothing_pending() -> bool:
    """No run waits in the runtime, and no started environment's callback server holds an open run."""
    runtime = get_runtime()
    servers = [getattr(env.executor, "server", None) for env in runtime._environments.values()]
    return len(runtime._runs) == 0 and all(server is None or not server.pending_runs for server in servers)


# -- a job API that answers 500 ----------------------------------------------------------------------------------------


class JobApi:
    """A job-submission HTTP API on loopback: answers ``POST /jobs`` with 500 ``failures`` times, then accepts the job
    and runs it with wove's async worker entrypoint (as a real job service would, somewhere else)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: list[str] = []  # run id of every POST /jobs
        self.jobs: set[asyncio.Task[Any]] = set()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/jobs", self._submit)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        for job in self.jobs:
            job.cancel()
        await asyncio.gather(*self.jobs, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    async def _submit(self, request: web.Request) -> web.Response:
        payload = await request.json()
        self.attempts.append(str(payload["run_id"]))
        if len(self.attempts) <= self.failures:
            return web.Response(status=500, text="scheduler database unavailable (upstream timeout)")
        job = asyncio.get_running_loop().create_task(_quietly(arun(payload)))
        self.jobs.add(job)
        job.add_done_callback(self.jobs.discard)
        return web.json_response({"job": f"job-{len(self.attempts)}"}, status=201)


async def _quietly(job: Any) -> None:
    with contextlib.suppress(Exception):  # the task's own outcome went to the weave already
        await job


class JobApiError(Exception):
    """What the adapter raises for a refused submission: the API's status and body, as its SDK would."""


class JobApiAdapter(BackendAdapter):
    """An adapter for ``JobApi``: ``submit`` posts the payload and raises on an error status."""

    backend: ClassVar[str] = "job-api"

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()

    async def submit(self, payload: Frame, frame: Frame) -> Any:
        async with self.session.post(f"{self.config['api_url']}/jobs", json=payload) as response:
            body = await response.text()
            if response.status >= 400:
                raise JobApiError(f"POST /jobs answered {response.status}: {body}")
            return json.loads(body)["job"]

    async def cancel(self, run_id: str, submission: Any, frame: Frame) -> None:
        """The API cannot cancel; the run's late frames are ignored."""

    async def close(self) -> None:
        await self.session.close()


@pytest.fixture
async def job_api() -> AsyncIterator[JobApi]:
    api = JobApi(failures=0)
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


def api_executor() -> BackendAdapterEnvironmentExecutor:
    return BackendAdapterEnvironmentExecutor("jobs", JobApiAdapter)


@pytest.mark.parametrize(("failures", "retries"), [(9, 2), (2, 2)], ids=["always-500", "500-twice-then-accepted"])
async def test_a_job_api_answering_500(job_api: JobApi, sent: SentFrames, failures: int, retries: int) -> None:
    job_api.failures = failures
    configure(api_executor, {"api_url": job_api.url}, retries=retries)
    began = time.monotonic()
    error: BaseException | None = None
    try:
        async with weave(a=20, b=22) as w:
            w.do(environment="jobs")(add)
    except Exception as exc:
        error = exc
    seconds = time.monotonic() - began
    attempts = len(job_api.attempts)
    assert attempts == retries + 1 == sent.submissions("add") == len(set(job_api.attempts))  # a new run per attempt
    statuses = [r.status for r in w.result.records["add"]]
    if failures > retries:
        assert isinstance(error, SubmitError)
        message = str(error)
        assert "environment 'jobs' (job-api)" in message
        assert "POST /jobs answered 500: scheduler database unavailable (upstream timeout)" in message
        assert statuses == ["failed"] * attempts
    else:
        assert error is None and w.result.add == 42
        assert statuses == ["failed", "failed", "succeeded"]
    assert nothing_pending()
    record(
        "submission refused: API 500",
        backend="custom adapter (HTTP job API)",
        retries=retries,
        failures=failures,
        submitted=sent.submissions("add"),
        backend_attempts=attempts,
        resolved=1,
        lost=0,
        duplicated=0,
        outcome="result" if error is None else type(error).__name__,
        error=str(error) if error else None,
        weave_seconds=round(seconds, 3),
    )


# -- a Celery broker that goes down ------------------------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of this test only, so it can be stopped and started again on the same port."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


def test_celery_broker_down_then_back(own_redis: RedisServer, sent: SentFrames, tmp_path: Path) -> None:
    """The broker stops while the environment is running: every attempt fails fast with Redis's own error; once the
    broker is back, the same environment submits again and the worker (which reconnected) runs the task."""
    broker, queue = own_redis.url(BROKER_DB), unique_queue("outage")
    worker = start_celery(tmp_path, broker, queue, concurrency=1)
    try:
        configure("celery", {"broker_url": broker, "queue": queue}, retries=2)
        w, error, _ = run_remote()
        assert error is None and w.result.add == 3  # the environment is up

        own_redis.stop()
        wait_until(lambda: not port_open(own_redis.port), 10, "redis stopped")
        w, down, seconds = run_remote()
        assert isinstance(down, SubmitError)
        message = str(down)
        assert "environment 'jobs' (celery): send_task failed" in message
        assert f"127.0.0.1:{own_redis.port}" in message and "Connection refused" in message
        attempts = [r.status for r in w.result.records["add"]]
        assert attempts == ["failed", "failed", "failed"] and sent.submissions("add") == 1 + 3
        assert nothing_pending()

        own_redis.start()  # the same port: the broker URL is unchanged
        back = time.monotonic()
        w, error, _ = run_remote(c=0)
        recovered = time.monotonic() - back
        assert error is None and w.result.add == 3
    finally:
        worker.stop()
    record(
        "submission refused: broker down",
        backend="celery",
        retries=2,
        submitted=3,
        backend_attempts=3,
        resolved=1,
        lost=0,
        duplicated=0,
        outcome=type(down).__name__,
        error=str(down),
        weave_seconds=round(seconds, 3),
        after_restart_weave_seconds=round(recovered, 3),
    )


def test_celery_broker_on_a_wrong_port(sent: SentFrames) -> None:
    """Nothing listens at the broker URL: the environment cannot start, each attempt says where it looked, and no run
    is ever submitted."""
    configure("celery", {"broker_url": "redis://127.0.0.1:1/0", "queue": "nowhere"}, retries=2)
    w, error, seconds = run_remote()
    assert isinstance(error, BackendUnavailableError)
    message = str(error)
    assert re.search(r"environment 'jobs' \(celery\): start failed at redis://\S*127\.0\.0\.1:1/0", message)
    assert "Connection refused" in message
    assert [r.status for r in w.result.records["add"]] == ["failed", "failed", "failed"]  # retries apply
    assert sent.submissions("add") == 0 and nothing_pending()  # never submitted, never waited for
    record(
        "submission refused: broker on a wrong port",
        backend="celery",
        retries=2,
        submitted=0,
        attempts=3,
        resolved=1,
        lost=0,
        duplicated=0,
        outcome=type(error).__name__,
        error=str(error),
        weave_seconds=round(seconds, 3),
    )


class UnreachableExecutor(EnvironmentExecutor):
    """An executor whose backend cannot be reached: ``start`` fails, and counts how often it was tried."""

    starts = 0

    async def start(self, **_: Any) -> None:
        UnreachableExecutor.starts += 1
        raise ConnectionRefusedError("cluster API at 127.0.0.1:1 refused the connection")

    async def send(self, frame: Frame) -> None:
        raise AssertionError("nothing may be sent to an executor that never started")

    async def recv(self) -> Frame:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        pass


def test_an_environment_that_cannot_start_fails_every_attempt(sent: SentFrames) -> None:
    """Each attempt tries to start the environment again, fails with the backend's message, and is recorded as
    failed (not left ``pending``); nothing is submitted, so nothing is waited for."""
    UnreachableExecutor.starts = 0
    configure(UnreachableExecutor, {}, retries=2)
    w, error, seconds = run_remote()
    assert isinstance(error, BackendUnavailableError)
    assert "environment 'jobs' failed to start: ConnectionRefusedError: cluster API at 127.0.0.1:1" in str(error)
    records = w.result.records["add"]
    assert [r.status for r in records] == ["failed"] * 3 and all(r.error is not None for r in records)
    assert UnreachableExecutor.starts == 3 and sent.submissions("add") == 0 and nothing_pending()
    record(
        "submission refused: environment cannot start",
        backend="custom executor",
        retries=2,
        submitted=0,
        attempts=UnreachableExecutor.starts,
        resolved=1,
        lost=0,
        duplicated=0,
        outcome=type(error).__name__,
        error=str(error),
        weave_seconds=round(seconds, 3),
    )


# -- sbatch refusing the job -------------------------------------------------------------------------------------------


def test_sbatch_refusing_the_job(slurm_cluster: SlurmCluster, sent: SentFrames, tmp_path: Path) -> None:
    """A partition that does not exist: ``sbatch`` exits 1 with its reason, which the error quotes; each retry runs
    ``sbatch`` again (counted by a wrapper around the real command), and no job reaches the cluster."""
    calls = tmp_path / "sbatch-calls"
    wrapper = tmp_path / "sbatch"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec sbatch "$@"\n')
    wrapper.chmod(0o755)
    prefix = f"rel-refused-{uuid.uuid4().hex[:6]}"
    config = {
        "sbatch": str(wrapper),
        "sbatch_options": {"partition": "no-such-partition"},
        "job_name_prefix": prefix,
        "output_dir": str(tmp_path / "out"),
        "env": {"PYTHONPATH": str(ROOT)},
    }
    configure("slurm", config, retries=2)
    w, error, seconds = run_remote()
    assert isinstance(error, SubmitError)
    message = str(error)
    assert "environment 'jobs' (slurm): sbatch refused the job (exit status 1)" in message
    assert "invalid partition specified: no-such-partition" in message
    sbatch_calls = len(calls.read_text().splitlines())
    assert sbatch_calls == 3 == sent.submissions("add")
    assert [r.status for r in w.result.records["add"]] == ["failed", "failed", "failed"]
    assert not [name for name, _ in slurm_cluster.jobs().values() if name.startswith(prefix)]
    assert nothing_pending()
    record(
        "submission refused: sbatch fails",
        backend="slurm",
        retries=2,
        submitted=sent.submissions("add"),
        backend_attempts=sbatch_calls,
        resolved=1,
        lost=0,
        duplicated=0,
        outcome=type(error).__name__,
        error=str(error),
        weave_seconds=round(seconds, 3),
    )
