"""The ``process`` backend end to end: real worker processes, the real callback server, driven through
``BackendAdapterEnvironmentExecutor`` exactly as the runtime drives it (start/send/recv/stop)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest

from tests.integration import queue_support
from wove._types import Frame
from wove.environment.remote import BackendAdapterEnvironmentExecutor
from wove.errors import BackendUnavailableError, ConfigError, DeliveryLostError, SubmitError
from wove.integrations.process import ProcessAdapter

pytestmark = pytest.mark.integration


class CustomError(Exception):
    """Defined in this module, so it crosses the process boundary by reference, like user code would."""


def add(a: int, b: int) -> int:
    return a + b


async def add_async(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


def whoami() -> int:
    return os.getpid()


def fail(message: str) -> None:
    raise CustomError(message)


def nap(seconds: float) -> str:
    time.sleep(seconds)
    return "rested"


def noisy() -> str:
    print("task output goes to stderr, not into the protocol pipe")
    return sys.stdin.read()  # the worker's stdin is /dev/null, not the payload pipe


def size_of(blob: bytes) -> int:
    return len(blob)


class Driver(queue_support.Driver):
    """The shared executor driver, plus what the process pool's tests look at."""

    @property
    def adapter(self) -> ProcessAdapter:
        assert isinstance(self.executor.adapter, ProcessAdapter)
        return self.executor.adapter

    async def started(self, run_id: str, timeout: float = 15.0) -> Frame:
        async def wait() -> Frame:
            while True:
                for frame in self.frames.get(run_id, []):
                    if frame["type"] == "task_started":
                        return frame
                await asyncio.sleep(0.01)

        return await asyncio.wait_for(wait(), timeout)

    async def run(self, func: Any, **args: Any) -> Frame:
        return await self.outcome(await self.submit(func, **args))

    async def _receiver_stop(self) -> None:
        self._receiver.cancel()
        await asyncio.gather(self._receiver, return_exceptions=True)


async def start_driver(
    executor_config: dict[str, Any] | None = None, adapter_class: type[ProcessAdapter] | None = None
) -> Driver:
    executor = BackendAdapterEnvironmentExecutor("procs", adapter_class)
    config = {"max_workers": 2, **(executor_config or {})}
    await executor.start(
        environment_name="procs",
        environment_config={"executor": "process", "executor_config": config},
        run_config={},
    )
    return Driver(executor)


@pytest.fixture
async def driver() -> AsyncIterator[Driver]:
    started = await start_driver()
    try:
        yield started
    finally:
        await started.close()


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_result_with_timing_and_placement(driver: Driver) -> None:
    run_id = await driver.submit(add, a=2, b=3)
    result = await driver.outcome(run_id)
    assert result["type"] == "task_result" and result["result"] == 5
    kinds = [frame["type"] for frame in driver.frames[run_id]]
    assert kinds == ["task_result"]  # a short run on the pool: its start rides on its terminal frame
    assert result["submitted_at"] <= result["started_at"] <= result["finished_at"]
    assert isinstance(result["host"], str) and result["pid"] != os.getpid()
    assert result["pid"] in driver.adapter.worker_pids()


async def test_workers_call_back_over_the_servers_unix_socket(driver: Driver) -> None:
    """Pool workers share the host: their frames go through the server's Unix socket, not loopback TCP."""
    socket_path = driver.executor.callback_socket
    assert socket_path is not None and os.path.exists(socket_path)
    pid = (await driver.run(whoami))["result"]
    server = driver.executor.server
    assert server is not None and server.public_url is not None
    port = int(server.public_url.rsplit(":", 1)[1])
    tcp = [c for c in psutil.Process(pid).net_connections(kind="inet") if c.raddr and c.raddr.port == port]
    assert tcp == []


async def test_without_a_unix_socket_workers_call_back_over_tcp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / ("d" * 120)  # no Unix socket can be bound this deep: the pool must still work
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    driver = await start_driver()
    try:
        assert driver.executor.callback_socket is None
        assert (await driver.run(add, a=1, b=1))["result"] == 2
    finally:
        await driver.close()


async def test_callback_socket_can_be_turned_off_and_must_be_a_bool() -> None:
    driver = await start_driver({"callback_socket": False})
    try:
        assert driver.executor.callback_socket is None
        assert (await driver.run(add, a=2, b=2))["result"] == 4
    finally:
        await driver.close()
    with pytest.raises(ConfigError, match="callback_socket must be true or false"):
        await start_driver({"callback_socket": "yes"})


async def test_async_callable(driver: Driver) -> None:
    assert (await driver.run(add_async, a=4, b=5))["result"] == 9


async def test_exception_keeps_its_type(driver: Driver) -> None:
    error = await driver.run(fail, message="bad input")
    assert error["type"] == "task_error"
    assert type(error["exception"]) is CustomError and str(error["exception"]) == "bad input"
    assert error["error"]["source"] == "task"


async def test_task_output_does_not_break_the_worker(driver: Driver) -> None:
    assert (await driver.run(noisy))["result"] == ""
    assert (await driver.run(add, a=1, b=1))["result"] == 2


async def test_workers_are_long_lived(driver: Driver) -> None:
    pids = {(await driver.run(whoami))["result"] for _ in range(6)}
    assert pids <= set(driver.adapter.worker_pids())
    assert len(pids) <= 2


async def test_cancel_running_kills_and_replaces_the_worker(driver: Driver) -> None:
    run_id = await driver.submit(nap, seconds=60)
    await driver.started(run_id)
    pid = driver.adapter.running_pid(run_id)
    assert pid is not None
    await driver.executor.send({"type": "cancel_task", "run_id": run_id, "task_id": None})
    cancelled = await driver.outcome(run_id, timeout=5)
    assert cancelled["type"] == "task_cancelled"
    assert not psutil.pid_exists(pid)
    await wait_for(lambda: pid not in driver.adapter.worker_pids() and len(driver.adapter.worker_pids()) >= 1)
    assert (await driver.run(add, a=1, b=2))["result"] == 3


async def test_cancel_queued_run_never_starts(driver: Driver) -> None:
    busy = [await driver.submit(nap, seconds=1.0) for _ in range(2)]
    queued = await driver.submit(whoami)
    await driver.executor.send({"type": "cancel_task", "run_id": queued, "task_id": None})
    assert (await driver.outcome(queued, timeout=5))["type"] == "task_cancelled"
    for run_id in busy:
        assert (await driver.outcome(run_id))["result"] == "rested"
    assert [frame["type"] for frame in driver.frames[queued]] == ["task_cancelled"]


async def test_cancel_after_finish_is_ignored(driver: Driver) -> None:
    run_id = await driver.submit(add, a=1, b=1)
    await driver.outcome(run_id)
    await driver.executor.send({"type": "cancel_task", "run_id": run_id, "task_id": None})
    await asyncio.sleep(0.2)
    assert [frame["type"] for frame in driver.frames[run_id]][-1] == "task_result"


async def test_killed_worker_is_reported_not_hung(driver: Driver) -> None:
    run_id = await driver.submit(nap, seconds=60)
    await driver.started(run_id)
    pid = driver.adapter.running_pid(run_id)
    assert pid is not None
    began = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    lost = await driver.outcome(run_id, timeout=5)
    assert time.monotonic() - began < 3
    assert lost["type"] == "task_error" and lost["error"]["kind"] == "WorkerLost"
    assert isinstance(lost["exception"], DeliveryLostError) and str(pid) in str(lost["exception"])
    assert (await driver.run(add, a=2, b=2))["result"] == 4  # the pool recovered


class RefusingAdapter(ProcessAdapter):
    async def submit(self, payload: Frame, frame: Frame) -> Any:
        raise ConnectionError("broker said no")


async def test_submission_failure_becomes_task_error() -> None:
    driver = await start_driver(adapter_class=RefusingAdapter)
    try:
        error = await driver.run(add, a=1, b=1)
    finally:
        await driver.close()
    assert error["type"] == "task_error" and error["error"]["source"] == "submit"
    exc = error["exception"]
    assert isinstance(exc, SubmitError) and isinstance(exc.__cause__, ConnectionError)
    assert "'procs'" in str(exc) and "broker said no" in str(exc)


async def test_unpicklable_arguments_fail_the_run_not_the_executor(driver: Driver) -> None:
    error = await driver.run(size_of, blob=threading.Lock())
    assert error["type"] == "task_error" and error["error"]["source"] == "submit"
    assert (await driver.run(add, a=1, b=1))["result"] == 2


async def test_many_concurrent_runs(driver: Driver) -> None:
    run_ids = [await driver.submit(add, a=i, b=i) for i in range(100)]
    outcomes = await asyncio.gather(*(driver.outcome(run_id, timeout=30) for run_id in run_ids))
    assert [frame["result"] for frame in outcomes] == [2 * i for i in range(100)]


async def test_large_payload_goes_by_reference() -> None:
    seen: list[Frame] = []

    class SpyAdapter(ProcessAdapter):
        async def submit(self, payload: Frame, frame: Frame) -> Any:
            seen.append(payload)
            return await super().submit(payload, frame)

    driver = await start_driver({"inline_payload_limit": 4096}, adapter_class=SpyAdapter)
    try:
        blob = os.urandom(3 * 1024 * 1024)
        assert (await driver.run(size_of, blob=blob))["result"] == len(blob)
        assert (await driver.run(add, a=1, b=2))["result"] == 3
    finally:
        await driver.close()
    assert isinstance(seen[0]["args_pickle"], dict) and "ref" in seen[0]["args_pickle"]
    assert isinstance(seen[1]["args_pickle"], str)


async def test_stop_is_idempotent_and_kills_workers() -> None:
    driver = await start_driver()
    await driver.run(add, a=1, b=1)
    pids = driver.adapter.worker_pids()
    await driver.close()
    await driver.executor.stop()
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_stop_after_failed_start_and_unknown_adapter() -> None:
    executor = BackendAdapterEnvironmentExecutor("nowhere")
    with pytest.raises(ConfigError, match="unknown backend adapter 'nope'"):
        await executor.start(environment_name="nowhere", environment_config={"executor": "nope"}, run_config={})
    await executor.stop()
    await executor.stop()


async def test_missing_backend_sdk_names_the_pip_command() -> None:
    class NeedsSdk(ProcessAdapter):
        required_modules = ("wove_test_missing_sdk",)
        install_hint = "pip install 'wove[missing]'"

    executor = BackendAdapterEnvironmentExecutor("sdk", NeedsSdk)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'wove\[missing\]'"):
        await executor.start(environment_name="sdk", environment_config={"executor": "process"}, run_config={})
    await executor.stop()


async def test_heartbeats_flow_while_a_task_runs(driver: Driver) -> None:
    run_id = await driver.submit(nap, seconds=0.6, delivery={"heartbeat_seconds": 0.3})
    assert (await driver.outcome(run_id))["result"] == "rested"
    beats = [frame for frame in driver.frames[run_id] if frame["type"] == "heartbeat"]
    assert beats and all(beat["submitted_at"] <= beat["started_at"] for beat in beats)


class UnimportableWorker(ProcessAdapter):
    worker_entrypoint = "wove_test_no_such_module:run"


@pytest.mark.parametrize(
    ("adapter_class", "config"),
    [(UnimportableWorker, {}), (ProcessAdapter, {"python": "/nonexistent/python3"})],
    ids=["worker-crashes-on-start", "interpreter-missing"],
)
async def test_workers_that_cannot_start_fail_the_run(adapter_class: type[ProcessAdapter], config: Any) -> None:
    driver = await start_driver(config, adapter_class=adapter_class)
    try:
        error = await driver.run(add, a=1, b=1)
    finally:
        await driver.close()
    assert error["type"] == "task_error" and error["error"]["kind"] == "WorkerStartFailed"
    assert isinstance(error["exception"], BackendUnavailableError)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_public_callback_url_and_token() -> None:
    port = free_port()
    config = {"callback_port": port, "callback_url": f"http://127.0.0.1:{port}/behind-proxy", "callback_token": "tok"}
    seen: list[Frame] = []

    class SpyAdapter(ProcessAdapter):
        async def submit(self, payload: Frame, frame: Frame) -> Any:
            seen.append(payload)
            return await super().submit(payload, frame)

    driver = await start_driver(config, adapter_class=SpyAdapter)
    try:
        assert (await driver.run(add, a=20, b=22))["result"] == 42
        server = driver.executor.server
        assert server is not None and server.callback_url is not None
        url = seen[0]["callback_url"]
        assert url.startswith(f"http://127.0.0.1:{port}/behind-proxy/wove/runs/")
        assert "tok" not in url and server.callback_url.endswith("/tok")  # the master token never leaves
        assert driver.adapter.callback_url == f"http://127.0.0.1:{port}/behind-proxy"
        assert driver.executor.callback_socket is None and "callback_socket" not in seen[0]  # the URL given is used
    finally:
        await driver.close()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for 127.0.0.1."""
    if shutil.which("openssl") is None:
        message = "needs the openssl command to make a certificate: apt-get install openssl"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True)
    return cert, key


async def test_https_callbacks(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    config = {
        "callback_ssl_certfile": str(cert),
        "callback_ssl_keyfile": str(key),
        "env": {"WOVE_CALLBACK_CAFILE": str(cert)},  # workers trust the self-signed certificate
    }
    driver = await start_driver(config)
    try:
        assert driver.adapter.callback_url.startswith("https://")
        assert (await driver.run(add, a=1, b=2))["result"] == 3
    finally:
        await driver.close()


async def test_recv_fails_once_the_callback_server_dies(driver: Driver) -> None:
    await driver._receiver_stop()
    server = driver.executor.server
    assert server is not None
    await server.stop()
    with pytest.raises(BackendUnavailableError, match="callback server failed"):
        await asyncio.wait_for(driver.executor.recv(), 5)
    with pytest.raises(BackendUnavailableError):
        await asyncio.wait_for(driver.executor.recv(), 5)


async def test_an_abandoned_run_closes_its_url_and_frees_its_worker(driver: Driver) -> None:
    """When the weave stops waiting for a run (its worker went silent), the run's callback URL closes and the pool
    kills the worker that held it, so the slot comes back."""
    run_id = await driver.submit(nap, seconds=60)
    await driver.started(run_id)
    pid = driver.adapter.running_pid(run_id)
    assert pid is not None and driver.executor.server is not None
    assert run_id in driver.executor.server.pending_runs
    driver.executor.forget(run_id)
    assert run_id not in driver.executor.server.pending_runs
    await wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    results = await asyncio.gather(*(driver.run(add, a=n, b=1) for n in range(4)))
    assert [frame["result"] for frame in results] == [1, 2, 3, 4]  # both workers serve again
    assert driver.frames[run_id][-1]["type"] == "task_started"  # no outcome was invented for it
