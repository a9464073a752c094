"""Task functions the integration tests' workers load by reference, and the exception one of them raises.

Imports only the standard library, so every engine's worker (ARQ's in its own environment) imports it the way it
would import a user's module. The tests run workers from the repository root, with it on ``PYTHONPATH``.

``hold`` and ``hold_async`` stand for long tasks a test can end: each records its start in ``<folder>/started-<item>``
(one line with its pid per start, so a second delivery shows), then waits for ``<folder>/release`` and records
``finished-<item>``; the async one records ``cancelled-<item>`` when its coroutine is cancelled.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

#: How long a held task waits for its release before it ends anyway, so a forgotten one cannot hold a worker forever.
HOLD_LIMIT = 60.0


class InventoryError(Exception):
    """Raised in a worker; must reach the weave as itself."""


def add(a: int, b: int) -> int:
    return a + b


def where() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


def square(item: int) -> tuple[int, int]:
    return item * item, os.getpid()


def out_of_stock(sku: str) -> None:
    raise InventoryError(f"{sku} is out of stock")


def nap(seconds: float, pid_file: str) -> str:
    """Writes its pid to ``pid_file``, then sleeps."""
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)
    return "rested"


def tally(path: str, value: int, seconds: float = 0.0) -> int:
    """Appends its pid to ``path`` (a line per run), sleeps ``seconds``, returns ``value``."""
    with open(path, "a") as out:
        out.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return value


def hold(folder: str, item: int = 0) -> int:
    _started(folder, item)
    release = Path(folder, "release")
    deadline = time.monotonic() + HOLD_LIMIT
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    Path(folder, f"finished-{item}").touch()
    return item


async def hold_async(folder: str, item: int = 0) -> int:
    _started(folder, item)
    release = Path(folder, "release")
    deadline = time.monotonic() + HOLD_LIMIT
    try:
        while not release.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    except asyncio.CancelledError:
        Path(folder, f"cancelled-{item}").touch()
        raise
    Path(folder, f"finished-{item}").touch()
    return item


def tail(blob: bytes, folder: str) -> tuple[int, bytes]:
    """Held like ``hold`` (so a test can look at the engine while it runs); the size and last bytes of ``blob``."""
    hold(folder)
    return len(blob), blob[-16:]


def _started(folder: str, item: int) -> None:
    with open(Path(folder, f"started-{item}"), "a") as out:
        out.write(f"{os.getpid()}\n")
