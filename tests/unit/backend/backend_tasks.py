"""Task callables for the backend tests.

They live in an importable module so that cloudpickle pickles them by reference, as it would an application's tasks,
and worker subprocesses (run with the repository root on ``PYTHONPATH``) import them by name.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any


def add(a: int, b: int) -> int:
    return a + b


def boom(message: str = "boom") -> None:
    raise ValueError(message)


class RetryableError(Exception):
    retryable = True


def flaky() -> None:
    raise RetryableError("try again later")


class NeedsTwoArgs(Exception):
    """Pickles, but cannot be rebuilt: its constructor needs two arguments and ``args`` holds one."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def raise_needs_two() -> None:
    raise NeedsTwoArgs("left", "right")


def sleep_then(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


async def asleep_then(seconds: float, value: Any = None) -> Any:
    await asyncio.sleep(seconds)
    return value


def reverse(data: bytes) -> bytes:
    return data[::-1]


def lock() -> Any:
    return threading.Lock()


def pid() -> int:
    return os.getpid()


def touch(path: str) -> str:
    with open(path, "w"):
        pass
    return path


class Marker:
    """Unpickling a Marker creates the file at ``path``: shows whether a body was ever unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return touch, (self.path,)
