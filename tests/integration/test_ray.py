"""The ``ray`` backend against a real local Ray (GCS, raylet and worker processes), started once for this module, with
the real callback server and weaves driven end to end as a user writes them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest

import wove
from tests.integration.queue_support import ROOT, await_for, gone, run_doc_example
from tests.integration.remote_tasks import hold
from tests.integration.scenarios import BackendScenarios, Engine, release, started, starts, unreachable_run_fails
from tests.services.base import free_port
from wove import BackendUnavailableError, ConfigError, weave
from wove._types import Frame
from wove.environment.remote import BackendAdapterEnvironmentExecutor
from wove.integrations import get_adapter_class
from wove.integrations.ray import RayAdapter
from wove.result import RunRecord

try:
    import ray
except ImportError:  # pragma: no cover - CI installs it; a missing engine must fail there
    if os.environ.get("CI"):
        raise
    pytest.skip("ray is missing: pip install 'wove[ray]' (scripts/test does this)", allow_module_level=True)

pytestmark = pytest.mark.integration

HEARTBEAT = 2.0
#: Ray's socket paths (``<temp>/session_<timestamp>_<pid>/sockets/plasma_store``) must fit in 107 bytes.
MAX_TEMP_DIR = 40
#: What Ray's processes need: no token file under the home directory; the test task functions importable by workers;
#: and a worker that outlives its test gives up posting to the stopped callback server after 10 s, not 120 s.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT), "WOVE_POST_DEADLINE": "10"}


class RayEngine(Engine):
    """The module's local Ray, which the adapter attaches to and must leave running."""

    lost_within = HEARTBEAT  # Ray reported the crash; no heartbeat window had to lapse
    lost_message = "the Ray worker running the task died: WorkerCrashedError"
    carried_limit = 16 * 1024

    def check_ran(self, record: RunRecord, pid: int) -> None:
        assert ray.is_initialized()  # attached, not owned: still running after the environment stopped

    def check_mapped(self, records: list[RunRecord], pids: set[int]) -> None:
        assert len({r.submission for r in records}) == 20  # each run is its own Ray task
        assert ray.is_initialized()

    async def saw_cancel(self, records: list[RunRecord], pids: list[int]) -> None:
        await await_for(lambda: all(gone(pid) for pid in pids), 20, "force=True killed the worker process")

    async def after_loss(self, folder: Path) -> None:
        await release(folder)
        await asyncio.sleep(0.5)
        assert len(starts(folder)) == 1  # max_retries=0: Ray did not run it again

    @contextlib.contextmanager
    def watch_carried(self) -> Iterator[list[int]]:
        sizes: list[int] = []

        class SpyAdapter(RayAdapter):
            """Measures each payload exactly as it is handed to Ray."""

            async def submit(self, payload: Frame, frame: Frame) -> Any:
                sizes.append(len(json.dumps(payload)))
                return await super().submit(payload, frame)

        wove.config(
            environments={
                "default": {"executor": "local"},
                "jobs": {"executor": lambda: BackendAdapterEnvironmentExecutor("jobs", SpyAdapter)},
            }
        )
        yield sizes  # the task spec Ray carries


def short_temp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ray")
    if len(str(path)) <= MAX_TEMP_DIR:
        return path
    return Path(tempfile.mkdtemp(prefix="wove-ray-"))


@pytest.fixture(scope="module", autouse=True)
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One local Ray for the module (3-5 s to start); the adapter attaches to it and must leave it running."""
    temp = short_temp_dir(tmp_path_factory)
    with pytest.MonkeyPatch.context() as env:  # Ray's processes inherit the environment of ray.init
        for key, value in RAY_ENV.items():
            env.setenv(key, value)
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(temp), configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def configure(**config: Any) -> None:
    wove.config(
        environments={
            "default": {"executor": "local"},
            "jobs": {"executor": "ray", "executor_config": config, "delivery_heartbeat_seconds": HEARTBEAT},
        }
    )


@pytest.fixture
def engine() -> RayEngine:
    configure()
    return RayEngine()


@pytest.fixture
def victim(engine: RayEngine) -> RayEngine:
    """The module's Ray: the test kills the worker process running the task."""
    return engine


class TestScenarios(BackendScenarios):
    """The shared scenarios on Ray."""


def test_a_worker_that_cannot_reach_the_weave_fails_the_run() -> None:
    """The worker gives up posting after its WOVE_POST_DEADLINE (10 s for this Ray) and raises: the task ends
    with no outcome posted, and the adapter's sweep ends the run with that error instead of leaving it pending."""
    configure(callback_url=f"http://127.0.0.1:{free_port()}")
    unreachable = r"the Ray task failed before its worker reported an outcome: CallbackError: .*could not"
    unreachable_run_fails(unreachable)


def test_registered_under_its_name() -> None:
    assert get_adapter_class("ray") is RayAdapter


async def test_cancelling_the_weave_drops_a_queued_task(engine: RayEngine, tmp_path: Path) -> None:
    busy, queued = tmp_path / "busy", tmp_path / "queued"
    busy.mkdir()
    queued.mkdir()
    blockers = [ray.remote(hold).remote(str(busy), i) for i in range(2)]  # both CPUs busy outside wove

    async def run() -> None:
        async with weave(folder=str(queued)) as w:
            w.do(environment="jobs")(hold)

    task = asyncio.ensure_future(run())
    try:
        await started(busy, 2)
        await asyncio.sleep(1.0)  # submitted, waiting for a CPU
        assert not starts(queued)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await release(busy, task)
    assert ray.get(blockers, timeout=20) == [0, 1]
    await asyncio.sleep(1.0)  # CPUs are free: a queued task that was not cancelled would run now
    assert not starts(queued)


def test_remote_options_reach_ray() -> None:
    configure(remote_options={"num_cpus": 2})
    with weave() as w:

        @w.do(environment="jobs")
        def resources() -> dict[str, float]:
            import ray

            return dict(ray.get_runtime_context().get_assigned_resources())

    assert w.result.resources == {"CPU": 2.0}


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"remote_options": {"num_returns": 2}}, "may not set 'num_returns'"),
        ({"remote_options": {"retry_exceptions": True}}, "may not set 'retry_exceptions'"),
        ({"init_options": ["num_cpus"]}, r"executor_config\['init_options'\] must be a dict"),
        ({"address": "auto", "init_options": {"address": "auto"}}, "give the Ray address once"),
    ],
)
def test_bad_configuration_is_refused(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RayAdapter(name="jobs", config=config, callback_url="http://127.0.0.1:1", run_config={})


def test_unknown_remote_options_fail_at_start() -> None:
    configure(remote_options={"num_cpu": 1})
    with pytest.raises(ConfigError, match="invalid remote_options"), weave() as w:

        @w.do(environment="jobs")
        def never() -> None:
            pass


async def test_a_ray_that_cannot_start_is_backend_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    class UnreachableRay:
        exceptions = ray.exceptions

        def is_initialized(self) -> bool:
            return False

        def init(self, **options: Any) -> None:
            raise ConnectionError(f"no Ray cluster at {options['address']}")

    monkeypatch.setattr("wove.integrations.ray._import_ray", UnreachableRay)
    adapter = RayAdapter(name="jobs", config={"address": "10.0.0.9:6379"}, callback_url="http://x", run_config={})
    with pytest.raises(BackendUnavailableError, match="could not initialize Ray.*no Ray cluster at 10.0.0.9:6379"):
        await adapter.start()
    await adapter.close()
    assert adapter.owns_ray


def test_the_documented_example_starts_and_stops_its_own_ray(tmp_path: Path) -> None:
    # After the example: stop wove's environments, which must shut down the Ray that wove started.
    check = '\n    wove.shutdown()\n    import ray\n\n    print("initialized after shutdown:", ray.is_initialized())\n'
    temp = Path(tempfile.mkdtemp(prefix="wove-ray-"))
    env = {**RAY_ENV, "RAY_TMPDIR": str(temp)}
    try:
        doc = ROOT / "docs" / "backends" / "ray.md"
        done = run_doc_example(doc, '"executor": "ray"', env, tmp_path, append=check, timeout=90)
        leftovers = [p.pid for p in psutil.process_iter(["cmdline"]) if str(temp) in " ".join(p.info["cmdline"] or ())]
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert "total 15.0 priced by workers" in done.stdout and "Ray task of the first run: " in done.stdout
    assert "initialized after shutdown: False" in done.stdout
    assert not leftovers, f"Ray processes left running: {leftovers}"
