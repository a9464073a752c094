"""The ``ray`` backend against a real local Ray (GCS, raylet and worker processes), started once for this module, with
the real callback server and weaves driven end to end as a user writes them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest

import wove
from wove import BackendUnavailableError, ConfigError, DeliveryLostError, weave
from wove._types import Frame
from wove.environment.remote import BackendAdapterEnvironmentExecutor
from wove.integrations import get_adapter_class
from wove.integrations.ray import RayAdapter

try:
    import ray
except ImportError:  # pragma: no cover - CI installs it; a missing engine must fail there
    if os.environ.get("CI"):
        raise
    pytest.skip("ray is missing: pip install 'wove[ray]' (scripts/test does this)", allow_module_level=True)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT = 2.0
#: Ray's socket paths (``<temp>/session_<timestamp>_<pid>/sockets/plasma_store``) must fit in 107 bytes.
MAX_TEMP_DIR = 40
#: What Ray's processes need: no token file under the home directory; this module importable by workers; and a
#: worker that outlives its test gives up posting to the stopped callback server after 10 s, not 120 s.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT), "WOVE_POST_DEADLINE": "10"}


class InventoryError(Exception):
    """Raised in a Ray task; must reach the weave as itself."""


def wait_for_file(path: Path, limit: float) -> bool:
    """Sleep until ``path`` exists (at most ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return path.exists()


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


async def until(condition: Callable[[], Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_registered_under_its_name() -> None:
    assert get_adapter_class("ray") is RayAdapter


def test_local_remote_and_mapped_tasks() -> None:
    configure()
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
    assert len({r.submission for r in records}) == 20  # each run is its own Ray task
    assert ray.is_initialized()  # attached, not owned: still running after the environment stopped


def test_a_remote_exception_keeps_its_type() -> None:
    configure()
    with pytest.raises(InventoryError, match="out of stock"), weave() as w:

        @w.do(environment="jobs")
        def reserve() -> None:
            raise InventoryError("out of stock")

    assert w.result.records["reserve"][0].status == "failed"


async def test_cancelling_the_weave_kills_the_running_task(tmp_path: Path) -> None:
    configure()
    holder: dict[str, Any] = {}

    async def run() -> None:
        async with weave(folder=str(tmp_path)) as w:
            holder["w"] = w

            @w.do(environment="jobs")
            def sleeper(folder: str) -> None:
                Path(folder, "started").write_text(str(os.getpid()))
                wait_for_file(Path(folder, "release"), 30)
                Path(folder, "finished").touch()

    task = asyncio.ensure_future(run())
    started = tmp_path / "started"
    await until(lambda: started.exists() and started.read_text())
    pid = int(started.read_text())
    task.cancel()
    began = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - began < 2
    assert holder["w"].result.records["sleeper"][0].status == "cancelled"
    await until(lambda: gone(pid))  # force=True killed the worker process
    (tmp_path / "release").touch()
    await asyncio.sleep(0.5)
    assert not (tmp_path / "finished").exists()


async def test_cancelling_the_weave_drops_a_queued_task(tmp_path: Path) -> None:
    configure()
    release = tmp_path / "release"
    blockers = [ray.remote(wait_for_file).remote(release, 30) for _ in range(2)]  # both CPUs busy outside wove

    async def run() -> None:
        async with weave(folder=str(tmp_path)) as w:

            @w.do(environment="jobs")
            def queued(folder: str) -> None:
                Path(folder, "started").touch()

    task = asyncio.ensure_future(run())
    await asyncio.sleep(1.0)  # submitted, waiting for a CPU
    assert not (tmp_path / "started").exists()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.touch()
    assert ray.get(blockers, timeout=20) == [True, True]
    await asyncio.sleep(1.0)  # CPUs are free: a queued task that was not cancelled would run now
    assert not (tmp_path / "started").exists()


async def test_a_worker_killed_mid_task_is_reported_lost_at_once(tmp_path: Path) -> None:
    configure()

    async def run() -> None:
        async with weave(folder=str(tmp_path)) as w:

            @w.do(environment="jobs")
            def victim(folder: str) -> str:
                with open(Path(folder, "starts"), "a") as log:
                    log.write(f"{os.getpid()}\n")
                wait_for_file(Path(folder, "release"), 30)
                return "finished"

    task = asyncio.ensure_future(run())
    starts = tmp_path / "starts"
    await until(lambda: starts.exists() and starts.read_text().endswith("\n"))
    began = time.monotonic()
    os.kill(int(starts.read_text().split()[0]), signal.SIGKILL)
    with pytest.raises(DeliveryLostError, match="the Ray worker running the task died: WorkerCrashedError"):
        await asyncio.wait_for(task, 10)
    assert time.monotonic() - began < HEARTBEAT  # Ray reported the crash; no heartbeat window had to lapse
    (tmp_path / "release").touch()
    await asyncio.sleep(0.5)
    assert len(starts.read_text().split()) == 1  # max_retries=0: Ray did not run it again


def test_an_oversized_argument_goes_by_reference() -> None:
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
    blob = os.urandom(1024 * 1024)
    with weave(blob=blob) as w:

        @w.do(environment="jobs")
        def echo(blob: bytes) -> tuple[int, bytes]:
            return len(blob), blob[-16:]

    assert w.result.echo == (len(blob), blob[-16:])
    assert len(sizes) == 1 and sizes[0] < 16 * 1024, sizes  # the task spec Ray carries holds no megabyte


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
    page = (ROOT / "docs" / "backends" / "ray.md").read_text()
    example = next(
        block for block in re.findall(r"```python\n(.*?)```", page, flags=re.S) if '"executor": "ray"' in block
    )
    # After the example: stop wove's environments, which must shut down the Ray that wove started.
    check = '\n    wove.shutdown()\n    import ray\n\n    print("initialized after shutdown:", ray.is_initialized())\n'
    script = tmp_path / "example.py"
    script.write_text(example + check)
    temp = Path(tempfile.mkdtemp(prefix="wove-ray-"))
    env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": str(temp)}
    try:
        command = [sys.executable, str(script)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=tmp_path, env=env)
        leftovers = [p.pid for p in psutil.process_iter(["cmdline"]) if str(temp) in " ".join(p.info["cmdline"] or ())]
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    assert "total 15.0 priced by workers" in done.stdout and "Ray task of the first run: " in done.stdout
    assert "initialized after shutdown: False" in done.stdout
    assert not leftovers, f"Ray processes left running: {leftovers}"
