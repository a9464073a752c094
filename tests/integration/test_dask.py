"""The ``dask`` backend against a real cluster: a ``LocalCluster`` with two worker processes (one thread each), the
real scheduler, the real callback server, and weaves driven end to end as a user writes them."""

from __future__ import annotations

import asyncio
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import wove
from tests.integration.queue_support import ROOT, await_for, run_doc_example
from tests.integration.remote_tasks import hold
from tests.integration.scenarios import BackendScenarios, Engine, release, serves_runs, started, unreachable_run_fails
from tests.services.base import free_port
from wove import BackendUnavailableError, ConfigError, RunCancelledError, weave
from wove.integrations import get_adapter_class
from wove.integrations.dask import DaskAdapter
from wove.result import RunRecord

try:
    from distributed import Client, Future, LocalCluster
except ImportError:  # pragma: no cover - CI installs it; a missing engine must fail there
    if os.environ.get("CI"):
        raise
    pytest.skip(
        "distributed is not installed: pip install 'wove[dask]' (scripts/test does this)", allow_module_level=True
    )

pytestmark = pytest.mark.integration

HEARTBEAT = 2.0


def wove_keys(dask_scheduler: Any) -> list[str]:
    """Run on the scheduler: the wove keys it still holds."""
    return sorted(str(key) for key in dask_scheduler.tasks if str(key).startswith("wove-"))


def executing(dask_worker: Any) -> int:
    """Run on each worker: how many task functions its threads are still running (cancelled ones included)."""
    return len(dask_worker.state.executing)


def spec_sizes(dask_scheduler: Any) -> dict[str, int]:
    """Run on the scheduler: how many bytes each wove task's spec (function and arguments) takes."""
    return {str(key): len(pickle.dumps(ts.run_spec)) for key, ts in dask_scheduler.tasks.items() if "wove-" in str(key)}


class DaskEngine(Engine):
    """The cluster, and a client of the test's own to look at the scheduler and the workers."""

    cancel_running, cancel_queued = 2, 1  # two workers, one thread each: the third run waits
    interrupts_running = False  # Dask cannot interrupt a running function: it runs to its end
    lost_within = HEARTBEAT  # seen through the scheduler's events, before any heartbeat lapse
    lost_message = "left the cluster while holding the run"
    carried_limit = 16 * 1024

    def __init__(self, cluster: LocalCluster, client: Client) -> None:
        self.cluster, self.client = cluster, client

    def check_ran(self, record: RunRecord, pid: int) -> None:
        self.check_mapped([record], {pid})

    def check_mapped(self, records: list[RunRecord], pids: set[int]) -> None:
        for record in records:  # the Dask key names the task and the run
            assert str(record.submission).startswith(f"wove-{record.task}-") and record.run_id in str(record.submission)

    async def saw_cancel(self, records: list[RunRecord], pids: list[int]) -> None:
        await self.keys_released()

    async def settle(self) -> None:
        """The cancelled functions have ended, and their late frames were refused."""
        await await_for(lambda: not any(self.client.run(executing).values()), 20, "the workers are idle")

    async def keys_released(self) -> None:
        await await_for(lambda: not self.client.run_on_scheduler(wove_keys), 20, "the scheduler forgot every key")

    async def after_loss(self, folder: Path) -> None:
        await self.keys_released()  # released: Dask will not run it again
        # Dask may have restarted the key on the other worker before the release reached it; that copy runs to its
        # end and its frames are refused. Let it end, then check the cluster still serves runs.
        await release(folder)
        await self.settle()
        await serves_runs()

    async def carried_while_running(self, carried: list[int]) -> None:
        carried.extend(self.client.run_on_scheduler(spec_sizes).values())  # what the scheduler holds for the run


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",  # the scheduler's HTTP server listens even without a dashboard; never on 8787
        local_directory=str(tmp_path_factory.mktemp("dask")),
        # Workers unpickle the test task functions by reference; a cancelled function that outlives its test gives
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


@pytest.fixture
def engine(cluster: LocalCluster, client: Client) -> DaskEngine:
    configure({"address": cluster.scheduler_address})
    return DaskEngine(cluster, client)


@pytest.fixture
def victim(engine: DaskEngine) -> DaskEngine:
    """The shared cluster: the test kills one of its worker processes, which the nanny restarts."""
    return engine


class TestScenarios(BackendScenarios):
    """The shared scenarios on Dask."""


def test_registered_under_its_name() -> None:
    assert get_adapter_class("dask") is DaskAdapter


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


async def test_a_key_cancelled_outside_wove_ends_the_run(engine: DaskEngine, tmp_path: Path) -> None:
    async def run() -> None:
        async with weave(folder=str(tmp_path)) as w:
            w.do(environment="jobs")(hold)

    task = asyncio.ensure_future(run())
    try:
        await started(tmp_path, 1)
        (key,) = engine.client.run_on_scheduler(wove_keys)
        engine.client.cancel([Future(key, engine.client)], force=True)  # an operator cancels every client's interest
        with pytest.raises(RunCancelledError):
            await asyncio.wait_for(task, 10)
    finally:
        await release(tmp_path, task)
    await engine.settle()


def test_a_worker_that_cannot_reach_the_weave_fails_the_run(cluster: LocalCluster) -> None:
    """The worker gives up posting after its WOVE_POST_DEADLINE (10 s on this cluster) and raises: the key errs
    with no outcome posted, and the adapter ends the run with that error instead of leaving it pending."""
    configure({"address": cluster.scheduler_address, "callback_url": f"http://127.0.0.1:{free_port()}"})
    unreachable = r"failed before its worker reported an outcome: CallbackError: .*could not"
    unreachable_run_fails(unreachable)


def test_the_documented_example_runs(tmp_path: Path) -> None:
    doc = ROOT / "docs" / "backends" / "dask.md"
    done = run_doc_example(doc, "LocalCluster(", {"PYTHONPATH": str(ROOT)}, tmp_path, timeout=90)
    assert "total 15.0 priced by workers" in done.stdout and "Dask key of the first run: wove-price-" in done.stdout
    assert "Error" not in done.stderr and "Traceback" not in done.stderr, done.stderr  # a clean exit
