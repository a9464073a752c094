"""The ``dask`` backend against a real cluster: a ``LocalCluster`` with two worker processes (one thread each), the
real scheduler, the real callback server, and weaves driven end to end as a user writes them."""

from __future__ import annotations

import asyncio
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import wove
from tests.services.base import free_port
from wove import BackendUnavailableError, ConfigError, DeliveryLostError, weave
from wove.integrations import get_adapter_class
from wove.integrations.dask import DaskAdapter

try:
    from distributed import Client, LocalCluster
except ImportError:  # pragma: no cover - CI installs it; a missing engine must fail there
    if os.environ.get("CI"):
        raise
    pytest.skip(
        "distributed is not installed: pip install 'wove[dask]' (scripts/test does this)", allow_module_level=True
    )

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT = 2.0


class InventoryError(Exception):
    """Raised on a Dask worker; must reach the weave as itself."""


def wait_for_file(path: Path, limit: float) -> bool:
    """Sleep until ``path`` exists (at most ``limit`` seconds): a long task the test can end, since Dask cannot."""
    deadline = time.monotonic() + limit
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return path.exists()


def wove_keys(dask_scheduler: Any) -> list[str]:
    """Run on the scheduler: the wove keys it still holds."""
    return sorted(str(key) for key in dask_scheduler.tasks if str(key).startswith("wove-"))


def executing(dask_worker: Any) -> int:
    """Run on each worker: how many task functions its threads are still running (cancelled ones included)."""
    return len(dask_worker.state.executing)


def spec_sizes(dask_scheduler: Any) -> dict[str, int]:
    """Run on the scheduler: how many bytes each wove task's spec (function and arguments) takes."""
    return {str(key): len(pickle.dumps(ts.run_spec)) for key, ts in dask_scheduler.tasks.items() if "wove-" in str(key)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",  # the scheduler's HTTP server listens even without a dashboard; never on 8787
        local_directory=str(tmp_path_factory.mktemp("dask")),
        # Workers unpickle this module's functions by reference; a cancelled function that outlives its test gives
        # up posting to the stopped callback server after 10 s instead of holding its thread for 120 s.
        env={"PYTHONPATH": str(ROOT), "WOVE_POST_DEADLINE": "10"},
    )
    try:
        yield local
    finally:
        local.close()


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    """A client of the test's own, to look at the scheduler (and to hand to wove in one test)."""
    own = Client(cluster.scheduler_address, set_as_default=False)
    try:
        yield own
    finally:
        own.close()


def configure(config: dict[str, Any], **settings: Any) -> None:
    wove.config(
        environments={
            "default": {"executor": "local"},
            "jobs": {
                "executor": "dask",
                "executor_config": config,
                "delivery_heartbeat_seconds": HEARTBEAT,
                **settings,
            },
        }
    )


async def until(condition: Callable[[], Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_registered_under_its_name() -> None:
    assert get_adapter_class("dask") is DaskAdapter


def test_local_remote_and_mapped_tasks(cluster: LocalCluster) -> None:
    configure({"address": cluster.scheduler_address})
    with weave(n=20) as w:

        @w.do
        def items(n: int) -> list[int]:
            return list(range(n))

        @w.do("items", environment="jobs")
        def squared(item: int) -> tuple[int, int]:
            return item * item, os.getpid()

        @w.do(environment="jobs")
        def total(items: list[int]) -> int:
            return sum(items)

        @w.do
        def summary(squared: list[tuple[int, int]], total: int) -> tuple[int, int]:
            return sum(value for value, _ in squared), total

    assert w.result.summary == (sum(i * i for i in range(20)), 190)
    worker_pids = {pid for _, pid in w.result.squared}
    assert worker_pids and os.getpid() not in worker_pids
    records = w.result.records["squared"]
    assert [r.item for r in records] == list(range(20))
    assert all(r.pid in worker_pids and r.status == "succeeded" for r in records)
    assert all(str(r.submission).startswith("wove-squared-") and r.run_id in str(r.submission) for r in records)


def test_a_remote_exception_keeps_its_type(cluster: LocalCluster) -> None:
    configure({"address": cluster.scheduler_address})
    with pytest.raises(InventoryError, match="out of stock"), weave() as w:

        @w.do(environment="jobs")
        def reserve() -> None:
            raise InventoryError("out of stock")

    assert w.result.records["reserve"][0].status == "failed"


async def test_cancelling_the_weave_releases_keys_and_queued_tasks_never_start(
    cluster: LocalCluster, client: Client, tmp_path: Path
) -> None:
    configure({"address": cluster.scheduler_address})
    holder: dict[str, Any] = {}

    async def run() -> None:
        async with weave(folder=str(tmp_path)) as w:
            holder["w"] = w

            @w.do(range(3), environment="jobs")
            def sleeper(item: int, folder: str) -> None:
                Path(folder, f"started-{item}").write_text(str(os.getpid()))
                wait_for_file(Path(folder, "release"), 30)
                Path(folder, f"finished-{item}").touch()

    task = asyncio.ensure_future(run())
    await until(lambda: len(list(tmp_path.glob("started-*"))) == 2)  # two workers, one thread each: one queued
    task.cancel()
    began = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - began < 2
    assert {r.status for r in holder["w"].result.records["sleeper"]} == {"cancelled"}
    await until(lambda: not client.run_on_scheduler(wove_keys))  # the scheduler forgot every key
    (tmp_path / "release").touch()  # Dask cannot interrupt the two running functions: let them end
    await until(lambda: not any(client.run(executing).values()))  # ended, and their late frames were refused
    await asyncio.sleep(0.3)  # a free thread would now pick up the queued task, had it not been cancelled
    assert len(list(tmp_path.glob("finished-*"))) == 2 and len(list(tmp_path.glob("started-*"))) == 2


async def test_a_worker_killed_mid_task_is_reported_lost_at_once(
    cluster: LocalCluster, client: Client, tmp_path: Path
) -> None:
    configure({"address": cluster.scheduler_address})
    starts = tmp_path / "starts"

    async def run() -> None:
        async with weave(folder=str(tmp_path)) as w:

            @w.do(environment="jobs")
            def victim(folder: str) -> str:
                with open(Path(folder, "starts"), "a") as log:
                    log.write(f"{os.getpid()}\n")
                wait_for_file(Path(folder, "release"), 30)
                return "finished"

    task = asyncio.ensure_future(run())
    await until(lambda: starts.exists() and starts.read_text().endswith("\n"))
    pid = int(starts.read_text().split()[0])
    began = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(DeliveryLostError, match="left the cluster while holding the run"):
        await asyncio.wait_for(task, 10)
    assert time.monotonic() - began < HEARTBEAT  # seen through the scheduler's events, before any heartbeat lapse
    await until(lambda: not client.run_on_scheduler(wove_keys))  # released: Dask will not run it again
    # Dask may have restarted the key on the other worker before the release reached it; that copy runs to its end
    # and its frames are refused. Let it end, then check the cluster still serves runs.
    (tmp_path / "release").touch()
    await until(lambda: not any(client.run(executing).values()))
    async with weave() as w:

        @w.do(environment="jobs")
        def after() -> int:
            return 42

    assert w.result.after == 42


async def test_an_oversized_argument_goes_by_reference(cluster: LocalCluster, client: Client, tmp_path: Path) -> None:
    configure({"address": cluster.scheduler_address})
    blob = os.urandom(1024 * 1024)
    sizes: dict[str, int] = {}

    async def run() -> Any:
        async with weave(blob=blob, folder=str(tmp_path)) as w:

            @w.do(environment="jobs")
            def echo(blob: bytes, folder: str) -> tuple[int, bytes]:
                Path(folder, "running").touch()
                wait_for_file(Path(folder, "release"), 30)
                return len(blob), blob[-16:]

        return w.result.echo

    task = asyncio.ensure_future(run())
    await until((tmp_path / "running").exists)
    sizes.update(client.run_on_scheduler(spec_sizes))  # what the scheduler holds for the running task
    (tmp_path / "release").touch()
    assert await task == (len(blob), blob[-16:])
    assert len(sizes) == 1 and max(sizes.values()) < 16 * 1024, sizes


def test_an_existing_client_is_used_and_left_open(client: Client) -> None:
    seen: list[Any] = []
    client.subscribe_topic("all", seen.append)  # the user's own handler survives wove's
    configure({"client": client})
    with weave() as w:

        @w.do(environment="jobs")
        def where() -> int:
            return os.getpid()

    wove.shutdown()
    assert w.result.where != os.getpid()
    assert client.submit(sum, [1, 2], pure=False).result() == 3
    assert client._event_handlers["all"] == seen.append


def test_submit_options_reach_the_scheduler(cluster: LocalCluster, client: Client) -> None:
    first = sorted(client.scheduler_info()["workers"])[0]
    pid = client.run(os.getpid, workers=[first])[first]
    configure({"address": cluster.scheduler_address, "submit_options": {"workers": [first], "priority": 10}})
    with weave() as w:

        @w.do(range(6), environment="jobs")
        def where(item: int) -> int:
            return os.getpid()

    assert set(w.result.where) == {pid}


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({}, "needs executor_config"),
        ({"address": "tcp://127.0.0.1:1", "client": object()}, "not both"),
        ({"address": "tcp://127.0.0.1:1", "submit_options": {"retries": 2}}, r"\['retries'\] are not supported"),
        ({"address": "tcp://127.0.0.1:1", "submit_options": {"key": "x"}}, "wove sets the key itself"),
        ({"client": object()}, "must be a distributed.Client"),
        ({"address": "tcp://127.0.0.1:1", "client_options": {"asynchronous": True}}, "asynchronous"),
    ],
)
def test_bad_configuration_is_refused(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DaskAdapter(name="jobs", config=config, callback_url="http://127.0.0.1:1", run_config={})


def test_an_unreachable_scheduler_names_the_address() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    configure({"address": address, "client_options": {"timeout": 1}})
    with (
        pytest.raises(BackendUnavailableError, match=f"cannot connect to the Dask scheduler at '{address}'"),
        weave() as w,
    ):

        @w.do(environment="jobs")
        def never() -> None:
            pass


async def test_a_key_cancelled_outside_wove_ends_the_run(cluster: LocalCluster, client: Client, tmp_path: Path) -> None:
    from distributed import Future

    from wove import RunCancelledError

    configure({"address": cluster.scheduler_address})

    async def run() -> None:
        async with weave(folder=str(tmp_path)) as w:

            @w.do(environment="jobs")
            def sleeper(folder: str) -> None:
                Path(folder, "running").touch()
                wait_for_file(Path(folder, "release"), 30)

    task = asyncio.ensure_future(run())
    await until((tmp_path / "running").exists)
    (key,) = client.run_on_scheduler(wove_keys)
    client.cancel([Future(key, client)], force=True)  # an operator cancels every client's interest in the key
    with pytest.raises(RunCancelledError):
        await asyncio.wait_for(task, 10)
    (tmp_path / "release").touch()
    await until(lambda: not any(client.run(executing).values()))


def test_the_documented_example_runs(tmp_path: Path) -> None:
    page = (ROOT / "docs" / "backends" / "dask.md").read_text()
    example = next(block for block in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "LocalCluster(" in block)
    script = tmp_path / "example.py"
    script.write_text(example)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(script)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "total 15.0 priced by workers" in done.stdout and "Dask key of the first run: wove-price-" in done.stdout
    assert "Error" not in done.stderr and "Traceback" not in done.stderr, done.stderr  # a clean exit
