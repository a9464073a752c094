"""Task functions the reliability suite runs on real workers, loaded by reference (standard library only).

Every task leaves files a test counts: ``<folder>/started-<item>`` gets one line (the worker's pid) per start, so a
second delivery or a requeue shows; ``finished-<item>`` gets one line per execution that ran to its end. Workers run
from the repository root with it on ``PYTHONPATH`` (Celery, Slurm) or with the weave's ``sys.path`` (the ``process``
backend).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

#: How long a held task waits for its release before it ends anyway, so a forgotten one cannot hold a worker forever.
HOLD_LIMIT = 120.0


def starts(folder: str | Path, item: int = 0) -> list[int]:
    """The pid of every start of ``item`` so far (whole lines only: a start being written is not counted yet)."""
    return _pids(Path(folder, f"started-{item}"))


def finishes(folder: str | Path, item: int = 0) -> list[int]:
    """The pid of every execution of ``item`` that ran to its end."""
    return _pids(Path(folder, f"finished-{item}"))


def _pids(path: Path) -> list[int]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [int(line) for line in text[: text.rfind("\n") + 1].split()]


def _note(folder: str, kind: str, item: int) -> None:
    with open(Path(folder, f"{kind}-{item}"), "a") as out:
        out.write(f"{os.getpid()}\n")


def _start(folder: str, item: int) -> int:
    """Record this start; returns how many starts ``item`` has had, this one included."""
    _note(folder, "started", item)
    return len(starts(folder, item))


def hold(folder: str, item: int = 0) -> int:
    """Start, wait for ``<folder>/release``, finish; returns ``item``."""
    _start(folder, item)
    release = Path(folder, "release")
    deadline = time.monotonic() + HOLD_LIMIT
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    _note(folder, "finished", item)
    return item


def die_first(folder: str, kills: int, item: int = 0) -> int:
    """SIGKILL this worker process on each of the first ``kills`` starts (an OOM kill, a lost node); then return
    the number of starts."""
    count = _start(folder, item)
    if count <= kills:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # the signal is on its way
    _note(folder, "finished", item)
    return count


def freeze_first(folder: str, kills: int, item: int = 0) -> int:
    """SIGSTOP this worker process (a hung machine, a network partition: no frame, no exit) on each of the first
    ``kills`` starts; a test may SIGCONT it. Returns the number of starts once it runs to its end."""
    count = _start(folder, item)
    if count <= kills:
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(1)  # the other threads may stop first; this one stops at its next turn in the kernel
    _note(folder, "finished", item)
    return count


def double(item: int, folder: str) -> int:
    """The load tests' task: note the item in this worker's own file (one line per execution), return ``2 * item``."""
    with open(Path(folder, f"ran-{os.getpid()}"), "a") as out:
        out.write(f"{item}\n")
    return 2 * item


def add(a: int, b: int) -> int:
    return a + b
