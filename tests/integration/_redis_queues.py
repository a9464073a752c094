"""Shared by the ARQ and Taskiq integration tests: worker processes, and task functions their workers import.

This module imports neither SDK, so the workers of both engines (in their own virtual environments) can load the
task functions by reference, the way they would load a user's module.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.services.base import ManagedProcess

ROOT = Path(__file__).resolve().parents[2]


def require_sdk(*modules: str, venv_hint: str) -> None:
    """Skip the module when an SDK is missing, except in CI (``CI=true``), where the import error fails the run."""
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"{module} is not installed; {venv_hint}", allow_module_level=True)


class WorkerProcess(ManagedProcess):
    """A task-system worker started from the repository root, so workers import ``tests.*`` task functions."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str]) -> None:
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        super().__init__(args, log, env={**env, "PYTHONPATH": pythonpath}, cwd=ROOT)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker, then kill whatever is left of its process group (pool children included)."""
        try:
            super().stop(timeout)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)


def python_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


async def wait_for_file(path: Path, timeout: float = 20.0) -> str:
    """The contents of ``path`` once a worker has written it."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} was not written within {timeout}s"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.01)  # the writer may still be flushing
    return path.read_text()


# -- task functions workers load by reference ------------------------------------------------------------------------


class InventoryError(Exception):
    """Raised in a worker; must reach the weave as itself."""


def add(a: int, b: int) -> int:
    return a + b


def double(item: int) -> tuple[int, int]:
    return item * 2, os.getpid()


def out_of_stock(sku: str) -> None:
    raise InventoryError(f"{sku} is out of stock")


def size_of(blob: bytes) -> int:
    return len(blob)


async def nap_async(marker: str, seconds: float) -> str:
    """Writes ``<marker>.started`` (its pid), then ``.cancelled`` if cancelled, or ``.finished`` after ``seconds``."""
    Path(marker + ".started").write_text(str(os.getpid()))
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        Path(marker + ".cancelled").write_text("")
        raise
    Path(marker + ".finished").write_text("")
    return "rested"


def nap(marker: str, seconds: float) -> str:
    Path(marker + ".started").write_text(str(os.getpid()))
    time.sleep(seconds)
    Path(marker + ".finished").write_text("")
    return "rested"


def run_doc_example(doc: Path, marker: str, env: dict[str, str], cwd: Path) -> str:
    """Run the ```python block of ``doc`` containing ``marker`` as a script; return its standard output."""
    import re
    import subprocess

    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    script = cwd / "example.py"
    script.write_text(next(block for block in blocks if marker in block))
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
