"""A live progress display while a weave waits on remote tasks in a terminal.

One line per remote environment, redrawn in place: runs submitted (waiting for a worker), running, done and failed,
finished runs per second, and the task that has been running longest, with where it runs::

    wove  heavy    3 submitted   2 running  31 done   1 failed  12.4/s  oldest: priced[7] 2.1s on node4:3121

It reads the weave's run records (which the runtime updates as frames arrive), so it costs the tasks nothing, and it
erases itself when the weave ends. Shown only when standard error is a terminal, the weave has tasks outside the inline
environment, and progress is not disabled by ``wove.config(progress=False)`` or ``WOVE_PROGRESS=0``; only one weave of
the process draws at a time. Plain ANSI escapes, no dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Mapping
from typing import TextIO

from wove.result import RunRecord

__all__ = ["REFRESH_SECONDS", "ProgressDisplay", "maybe_display", "progress_enabled", "render"]

#: Seconds between redraws; a weave that ends sooner never draws.
REFRESH_SECONDS = 0.2

_OFF = frozenset({"0", "false", "no", "off"})
_FAILED = frozenset({"failed", "lost", "timed out", "cancelled"})
#: Erase the whole line the cursor is on.
_ERASE_LINE = "\x1b[2K"
#: Erase from the cursor to the end of the screen.
_ERASE_BELOW = "\x1b[J"
#: Only one display draws at a time: two weaves in two threads would overwrite each other's lines.
_drawing = threading.Lock()


def progress_enabled(setting: bool | None, stream: TextIO) -> bool:
    """Whether to draw: config says no, or ``WOVE_PROGRESS=0``, or not a terminal, means no."""
    if setting is False or os.environ.get("WOVE_PROGRESS", "").strip().lower() in _OFF:
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # a closed stream
        return False


def render(
    records: Mapping[str, list[RunRecord]],
    environments: set[str],
    started: float,
    now: float,
    clock: float | None = None,
) -> list[str]:
    """The display's lines, one per environment in ``environments``.

    ``started`` and ``now`` are ``time.monotonic()`` readings that give the throughput; ``clock`` (``time.time()``
    by default) dates the oldest running run, whose ``started_at`` is wall-clock time.
    """
    clock = time.time() if clock is None else clock
    names = sorted(environments)
    counts = {env: [0, 0, 0, 0] for env in names}
    oldest: dict[str, RunRecord] = {}
    for runs in records.values():
        for rec in runs:
            row = counts.get(rec.environment)
            if row is None:
                continue
            if rec.status == "submitted":
                row[0] += 1
            elif rec.status == "running":
                row[1] += 1
                first = oldest.get(rec.environment)
                if rec.started_at is not None and (first is None or rec.started_at < (first.started_at or clock)):
                    oldest[rec.environment] = rec
            elif rec.status == "succeeded":
                row[2] += 1
            elif rec.status in _FAILED:
                row[3] += 1
    width = max(len(name) for name in names) if names else 0
    elapsed = max(now - started, 1e-9)
    lines = []
    for env in names:
        submitted, running, done, failed = counts[env]
        line = (
            f"wove  {env:<{width}}  {submitted:>3} submitted  {running:>3} running  {done:>3} done  {failed:>3} failed"
            f"  {(done + failed) / elapsed:.1f}/s"
        )
        longest = oldest.get(env)
        if longest is not None and longest.started_at is not None:
            line += f"  oldest: {longest.label} {max(0.0, clock - longest.started_at):.1f}s"
            if longest.host:
                line += f" on {longest.host}" + (f":{longest.pid}" if longest.pid is not None else "")
        lines.append(line)
    return lines


def _columns(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # no file descriptor (a test's stream), or not a terminal
        columns = 0
    return columns or shutil.get_terminal_size().columns  # 0: a terminal that never said its size


class ProgressDisplay:
    """Redraws the progress lines in place until stopped, then erases them."""

    def __init__(self, records: Mapping[str, list[RunRecord]], environments: set[str], stream: TextIO) -> None:
        self._records = records
        self._environments = environments
        self._stream = stream
        self._task: asyncio.Task[None] | None = None
        self._drawn = 0  # lines on screen; the cursor rests at the end of the last one

    def start(self) -> bool:
        """Draw every ``REFRESH_SECONDS`` from the running event loop (the weave's); False when another display of
        this process is drawing, in which case this one never draws."""
        if not _drawing.acquire(blocking=False):
            return False
        try:
            self._task = asyncio.get_running_loop().create_task(self._draw())
        except BaseException:
            _drawing.release()
            raise
        return True

    async def _draw(self) -> None:
        started = time.monotonic()
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            self.draw(render(self._records, self._environments, started, time.monotonic()))

    def draw(self, lines: list[str]) -> None:
        """Replace the lines on screen with ``lines``, each cut to the terminal's width so none wraps."""
        limit = max(_columns(self._stream) - 1, 10)
        text = "\n".join(_ERASE_LINE + line[:limit] for line in lines)
        self._write(self._home() + text + _ERASE_BELOW)
        self._drawn = len(lines)

    def _home(self) -> str:
        """Back to the first column of the first line drawn."""
        up = self._drawn - 1
        return "\r" + (f"\x1b[{up}A" if up > 0 else "")

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.write(text)
            self._stream.flush()

    async def stop(self) -> None:
        """Stop redrawing and erase what was drawn, leaving the cursor where the display began."""
        if self._task is None:
            return
        task, self._task = self._task, None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if self._drawn:
            self._write(self._home() + _ERASE_BELOW)
            self._drawn = 0
        _drawing.release()


def maybe_display(
    records: Mapping[str, list[RunRecord]],
    environments: set[str],
    setting: bool | None,
    stream: TextIO | None = None,
) -> ProgressDisplay | None:
    """A started display when it should be shown (on ``stream``, default standard error), else ``None``."""
    stream = sys.stderr if stream is None else stream
    if not environments or not progress_enabled(setting, stream):
        return None
    display = ProgressDisplay(records, environments, stream)
    return display if display.start() else None
