"""Helpers shared by the service fixtures: free ports, readiness waits, managed subprocesses."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def require_binary(name: str, install: str) -> str:
    """The path of ``name``; in CI a missing binary fails the run, elsewhere the test is skipped."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed; install it with: {install} (scripts/test does this)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` (and the log's tail) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    raise TimeoutError(f"{what} not ready after {timeout}s{tail}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class ManagedProcess:
    """A subprocess whose output goes to a log file, stopped (then killed) on ``stop``."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.args = list(args)
        self.log = log
        self._log_file = log.open("ab")
        self.process = subprocess.Popen(
            self.args,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self._log_file.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
