"""The ``process`` pool's prefetch: short runs handed to a worker several at a time, and taking them back.

Real worker processes and the real callback server, driven through the executor as the runtime drives it. Each test
first runs a few tasks so the pool has run times to judge by, and counts every run as short
(``PREFETCH_BELOW`` raised): on a loaded machine a trivial run's round trip may take longer than the 5 ms that
makes a run short, and these tests are about what prefetching does, not about when it starts.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import psutil  # type: ignore[import-untyped]
import pytest

from tests.integration.test_process_backend import Driver, add, nap, start_driver, wait_for, whoami
from wove.environment.remote import BackendAdapterEnvironmentExecutor
from wove.errors import ConfigError, DeliveryLostError
from wove.integrations import process
from wove.integrations.process import ProcessAdapter

pytestmark = pytest.mark.integration


def wait_for_file(path: str) -> int:
    """Block until ``path`` exists (the test decides when a long run ends); return this worker's pid."""
    while not os.path.exists(path):
        time.sleep(0.01)
    return os.getpid()


def touch(path: str) -> int:
    Path(path).touch()
    return os.getpid()


@pytest.fixture(autouse=True)
def every_run_is_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "PREFETCH_BELOW", 60.0)


@pytest.fixture
async def one_worker() -> AsyncIterator[Driver]:
    """A pool of one worker that may hold four runs, which already knows its runs are short."""
    driver = await start_driver({"max_workers": 1, "prefetch": 4})
    try:
        for n in range(5):  # the first run is slow (imports); the pool judges by the median of the last few
            assert (await driver.run(add, a=n, b=1))["result"] == n + 1
        yield driver
    finally:
        await driver.close()


async def test_short_runs_are_handed_out_several_at_a_time() -> None:
    driver = await start_driver({"max_workers": 2, "prefetch": 4})
    try:
        for n in range(5):  # the first run is slow (imports); the pool judges by the median of the last few
            await driver.run(add, a=n, b=0)
        held = []  # after each submission: how many runs each worker holds, by pid
        run_ids = []
        for n in range(40):
            run_ids.append(await driver.submit(add, a=n, b=n))
            pids = [driver.adapter.running_pid(run_id) for run_id in run_ids]
            held.append(max((pids.count(pid) for pid in set(pids) if pid is not None), default=0))
        results = [(await driver.outcome(run_id))["result"] for run_id in run_ids]
        assert results == [2 * n for n in range(40)]
        assert max(held) > 1, "no worker ever held more than one run"
        assert max(held) <= 4
    finally:
        await driver.close()


async def test_outcomes_of_short_runs_do_not_wait_for_a_long_one(one_worker: Driver, tmp_path: Path) -> None:
    release = tmp_path / "release"
    short = await one_worker.submit(add, a=2, b=3)
    long = await one_worker.submit(wait_for_file, path=str(release))
    assert one_worker.adapter.running_pid(long) is not None  # both went to the worker together
    assert (await one_worker.outcome(short, timeout=5))["result"] == 5
    assert "task_result" not in one_worker.kinds(long), "the long run ended before it was released"
    release.touch()
    assert (await one_worker.outcome(long))["type"] == "task_result"


async def test_an_idle_worker_takes_back_a_run_waiting_behind_a_long_one(tmp_path: Path) -> None:
    driver = await start_driver({"max_workers": 2, "min_workers": 2, "prefetch": 4})
    try:
        for n in range(5):
            await driver.run(add, a=n, b=0)
        first, second = tmp_path / "first", tmp_path / "second"
        long = await driver.submit(wait_for_file, path=str(first))
        short_long = await driver.submit(wait_for_file, path=str(second))
        behind = await driver.submit(whoami)
        long_pid, other_pid = driver.adapter.running_pid(long), driver.adapter.running_pid(short_long)
        assert long_pid is not None and other_pid is not None and long_pid != other_pid
        assert driver.adapter.running_pid(behind) in (long_pid, other_pid)  # held behind one of them
        holder = driver.adapter.running_pid(behind)
        (first if holder == other_pid else second).touch()  # the worker not holding it runs out of work first
        free_pid = long_pid if holder == other_pid else other_pid
        assert (await driver.outcome(behind, timeout=10))["result"] == free_pid
        assert "task_result" not in driver.kinds(long if holder == long_pid else short_long)  # still blocked
        first.touch()
        second.touch()
        assert (await driver.outcome(long))["result"] == long_pid
        assert (await driver.outcome(short_long))["result"] == other_pid
    finally:
        await driver.close()


async def test_recalling_a_waiting_run_leaves_its_worker_alone(one_worker: Driver, tmp_path: Path) -> None:
    release, marker = tmp_path / "release", tmp_path / "ran"
    long = await one_worker.submit(wait_for_file, path=str(release))
    waiting = await one_worker.submit(touch, path=str(marker))
    after = await one_worker.submit(whoami)
    await one_worker.started(long)
    pid = one_worker.adapter.running_pid(long)
    assert pid is not None
    await wait_for(lambda: one_worker.adapter.running_pid(waiting) == one_worker.adapter.running_pid(after) == pid)
    await one_worker.executor.send({"type": "cancel_task", "run_id": waiting, "task_id": None})
    assert (await one_worker.outcome(waiting, timeout=5))["type"] == "task_cancelled"
    assert psutil.pid_exists(pid) and one_worker.adapter.worker_pids() == (pid,)
    release.touch()
    assert (await one_worker.outcome(long))["result"] == pid
    assert (await one_worker.outcome(after))["result"] == pid
    assert not marker.exists(), "the recalled run ran"


async def _long_run_holding_two(driver: Driver) -> tuple[str, list[str], int]:
    """A long run started on the one worker, which also holds two short runs behind it: ``(long, held, pid)``."""
    long = await driver.submit(nap, seconds=60)
    held = [await driver.submit(whoami) for _ in range(2)]
    await driver.started(long)
    pid = driver.adapter.running_pid(long)
    assert pid is not None
    await wait_for(lambda: {driver.adapter.running_pid(run_id) for run_id in held} == {pid})
    return long, held, pid


async def test_cancelling_a_running_run_requeues_what_its_worker_held(one_worker: Driver) -> None:
    long, held, pid = await _long_run_holding_two(one_worker)
    await one_worker.executor.send({"type": "cancel_task", "run_id": long, "task_id": None})
    assert (await one_worker.outcome(long, timeout=10))["type"] == "task_cancelled"
    assert not psutil.pid_exists(pid)
    pids = {(await one_worker.outcome(run_id, timeout=15))["result"] for run_id in held}
    assert len(pids) == 1 and pid not in pids, "the held runs did not move to the replacement worker"


async def test_a_worker_killed_while_holding_runs_reports_each_lost(one_worker: Driver) -> None:
    long, held, pid = await _long_run_holding_two(one_worker)
    os.kill(pid, signal.SIGKILL)
    for run_id in [long, *held]:
        lost = await one_worker.outcome(run_id, timeout=5)
        assert lost["type"] == "task_error" and isinstance(lost["exception"], DeliveryLostError)
    await wait_for(lambda: len(one_worker.adapter.worker_pids()) == 1 and pid not in one_worker.adapter.worker_pids())
    assert (await one_worker.run(add, a=2, b=2))["result"] == 4


async def test_prefetch_must_be_a_positive_integer_and_a_refused_start_leaves_nothing_listening() -> None:
    for bad in (0, -1, "4", True):
        executor = BackendAdapterEnvironmentExecutor("procs")
        config = {"executor": "process", "executor_config": {"prefetch": bad}}
        with pytest.raises(ConfigError, match="prefetch"):
            await executor.start(environment_name="procs", environment_config=config, run_config={})
        assert executor.server is not None and executor.callback_socket is not None
        port = urlsplit(executor.server.public_url or "").port
        assert port is not None
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        assert not os.path.exists(executor.callback_socket)


#: A worker that speaks the pool's protocol as an earlier wove did: one run at a time, no recalls.
PLAIN_WORKER = r"""
import json, os, socket, sys
from wove.backend.worker import run_backend_payload
init = json.loads(sys.stdin.readline())
print(json.dumps({"op": "ready", "pid": os.getpid(), "host": socket.gethostname()}), flush=True)
for line in sys.stdin:
    message = json.loads(line)
    try:
        run_backend_payload(message["payload"])
    finally:
        print(json.dumps({"op": "free", "run_id": message["payload"]["run_id"]}), flush=True)
"""


class PlainWorkerPool(ProcessAdapter):
    def _worker_command(self) -> list[str]:
        return [sys.executable, "-c", PLAIN_WORKER]


async def test_a_worker_that_does_not_answer_recalls_gets_one_run_at_a_time() -> None:
    driver = await start_driver({"max_workers": 1, "prefetch": 4}, PlainWorkerPool)
    try:
        for n in range(5):
            await driver.run(add, a=n, b=0)
        run_ids = [await driver.submit(add, a=n, b=n) for n in range(10)]
        held = [sum(driver.adapter.running_pid(run_id) is not None for run_id in run_ids)]
        results = [(await driver.outcome(run_id))["result"] for run_id in run_ids]
        assert results == [2 * n for n in range(10)]
        assert held == [1]
    finally:
        await driver.close()
