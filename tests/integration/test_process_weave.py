"""Weaves whose tasks run on the embedded ``process`` backend: the whole path a user takes, end to end.

Real worker processes, the real callback server over HTTP, the runtime's delivery policies on top.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest

import wove
from wove import DeliveryLostError, TaskTimeoutError, weave
from wove.environment import get_runtime

pytestmark = pytest.mark.integration


class InventoryError(Exception):
    """Raised in a worker; must reach the weave as itself."""


def configure(**settings: Any) -> None:
    wove.config(
        environments={
            "default": {"executor": "local"},
            "heavy": {"executor": "process", "executor_config": {"workers": 2}, **settings},
        }
    )


def test_local_and_remote_tasks_mix_and_mapped_results_keep_order() -> None:
    configure()
    with weave(n=20) as w:

        @w.do
        def items(n: int) -> list[int]:
            return list(range(n))

        @w.do("items", environment="heavy")
        def squared(item: int) -> tuple[int, int]:
            return item * item, os.getpid()

        @w.do(environment="heavy")
        async def async_remote(items: list[int]) -> int:
            await asyncio.sleep(0)
            return sum(items)

        @w.do
        def total(squared: list[tuple[int, int]], async_remote: int) -> tuple[int, int]:
            return sum(v for v, _ in squared), async_remote

    assert w.result.total == (sum(i * i for i in range(20)), 190)
    worker_pids = {pid for _, pid in w.result.squared}
    assert os.getpid() not in worker_pids
    records = w.result.records["squared"]
    assert [r.item for r in records] == list(range(20))
    assert all(r.pid in worker_pids and r.host and r.run_id for r in records)
    assert all(r.submitted_at <= r.started_at <= r.finished_at for r in records)  # type: ignore[operator]
    assert "squared[19]" in w.result.timeline()


def test_remote_exception_keeps_its_type_and_retries_apply(tmp_path: Path) -> None:
    configure(retries=1)
    marker = tmp_path / "attempted"
    with weave(marker=str(marker), error_mode="return") as w:

        @w.do(environment="heavy")
        def flaky(marker: str) -> str:
            if not os.path.exists(marker):
                Path(marker).touch()
                raise ConnectionError("first attempt fails")
            return "second attempt"

        @w.do(environment="heavy", retries=0)
        def broken() -> None:
            raise InventoryError("out of stock")

    assert w.result.flaky == "second attempt"
    assert [r.status for r in w.result.records["flaky"]] == ["failed", "succeeded"]
    assert isinstance(w.result.errors["broken"], InventoryError)
    assert str(w.result.errors["broken"]) == "out of stock"


def _worker_pids() -> set[int]:
    me = psutil.Process()
    return {c.pid for c in me.children(recursive=True) if "_process_worker" in " ".join(c.cmdline())}


def test_a_task_timeout_cancels_the_remote_run_and_kills_its_worker() -> None:
    configure()
    with pytest.raises(TaskTimeoutError), weave() as w:

        @w.do(environment="heavy", timeout=1.0)
        def stuck() -> None:
            time.sleep(60)

    record = w.result.records["stuck"][0]
    assert record.status == "timed out" and record.pid is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and psutil.pid_exists(record.pid):
        time.sleep(0.05)
    assert not psutil.pid_exists(record.pid), "the worker running the timed-out task is still alive"


async def test_cancelling_the_weave_stops_remote_work(tmp_path: Path) -> None:
    configure()
    holder: dict[str, Any] = {}

    async def run() -> None:
        async with weave(folder=str(tmp_path)) as w:
            holder["w"] = w

            @w.do(range(2), environment="heavy")
            def sleeper(item: int, folder: str) -> None:
                Path(folder, f"started-{item}").write_text(str(os.getpid()))
                time.sleep(60)

    task = asyncio.ensure_future(run())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(list(tmp_path.glob("started-*"))) < 2:
        await asyncio.sleep(0.05)
    pids = {int(p.read_text()) for p in tmp_path.glob("started-*")}
    assert len(pids) == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert {r.status for r in holder["w"].result.records["sleeper"]} == {"cancelled"}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
        await asyncio.sleep(0.05)
    assert not any(psutil.pid_exists(p) for p in pids), "workers running the cancelled tasks were not killed"


def test_a_worker_killed_mid_task_is_reported_lost_not_hung() -> None:
    configure(delivery_heartbeat_seconds=1.0)
    started = time.monotonic()
    with pytest.raises(DeliveryLostError), weave() as w:

        @w.do(environment="heavy")
        def victim() -> None:
            os.kill(os.getpid(), signal.SIGKILL)

    assert time.monotonic() - started < 10
    assert w.result.records["victim"][0].status in ("failed", "lost")


def test_a_large_argument_goes_by_reference_and_comes_back() -> None:
    configure()
    blob = os.urandom(3 * 1024 * 1024)
    with weave(blob=blob) as w:

        @w.do(environment="heavy")
        def echo_size(blob: bytes) -> tuple[int, bytes]:
            return len(blob), blob[-16:]

    assert w.result.echo_size == (len(blob), blob[-16:])


def test_a_second_weave_reuses_the_started_environment() -> None:
    configure()
    for _ in range(3):
        with weave() as w:

            @w.do(environment="heavy")
            def pid() -> int:
                return os.getpid()

    assert get_runtime().started_environments == ("heavy",)
    env = get_runtime()._environments["heavy"]
    assert env.executor.server is not None  # type: ignore[attr-defined]
    first_server = env.executor.server  # type: ignore[attr-defined]
    with weave() as w:

        @w.do(environment="heavy")
        def again() -> int:
            return 1

    assert get_runtime()._environments["heavy"].executor.server is first_server  # type: ignore[attr-defined]
