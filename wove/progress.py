"""A one-line progress display while a weave waits on remote tasks in a terminal.

It reads the weave's run records (which the runtime updates as frames arrive), so it costs the tasks nothing.
Shown only when standard error is a terminal, the weave has tasks outside the inline environment, progress is
not disabled by ``wove.config(progress=False)`` or ``WOVE_PROGRESS=0``; it erases itself when the weave ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Mapping
from typing import TextIO

from wove.result import RunRecord

#: Seconds between redraws.
REFRESH_SECONDS = 0.2

_ACTIVE = frozenset({"submitted", "running"})


def progress_enabled(setting: bool | None, stream: TextIO) -> bool:
    """Whether to draw: config says no, or ``WOVE_PROGRESS=0``, or not a terminal, means no."""
    if setting is False or os.environ.get("WOVE_PROGRESS", "").strip() in {"0", "false", "no", "off"}:
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def render(records: Mapping[str, list[RunRecord]], environments: set[str], started: float, now: float) -> str:
    """One line: per environment submitted/running/done/failed, throughput, and the oldest running run."""
    counts: dict[str, list[int]] = {env: [0, 0, 0, 0] for env in sorted(environments)}
    oldest: float | None = None
    for runs in records.values():
        for rec in runs:
            if rec.environment not in counts:
                continue
            row = counts[rec.environment]
            if rec.status == "submitted":
                row[0] += 1
            elif rec.status == "running":
                row[1] += 1
                if rec.started_at is not None:
                    oldest = rec.started_at if oldest is None else min(oldest, rec.started_at)
            elif rec.status == "succeeded":
                row[2] += 1
            elif rec.status in ("failed", "lost", "timed out", "cancelled"):
                row[3] += 1
    parts = [f"{env}: {q} queued, {r} running, {d} done, {f} failed" for env, (q, r, d, f) in counts.items()]
    finished = sum(row[2] + row[3] for row in counts.values())
    rate = finished / max(now - started, 1e-9)
    line = "wove | " + " | ".join(parts) + f" | {rate:.1f}/s"
    if oldest is not None:
        line += f" | oldest running {max(0.0, time.time() - oldest):.1f}s"
    return line


class ProgressDisplay:
    """Redraws the progress line until stopped, then erases it."""

    def __init__(self, records: Mapping[str, list[RunRecord]], environments: set[str], stream: TextIO) -> None:
        self._records = records
        self._environments = environments
        self._stream = stream
        self._task: asyncio.Task[None] | None = None
        self._width = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._draw())

    async def _draw(self) -> None:
        started = time.monotonic()
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            line = render(self._records, self._environments, started, time.monotonic())
            self._write("\r" + line.ljust(self._width))
            self._width = len(line)

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.write(text)
            self._stream.flush()

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._width:
            self._write("\r" + " " * self._width + "\r")


def maybe_display(
    records: Mapping[str, list[RunRecord]], environments: set[str], setting: bool | None
) -> ProgressDisplay | None:
    """A started display when it should be shown, else ``None``."""
    stream = sys.stderr
    if not environments or not progress_enabled(setting, stream):
        return None
    display = ProgressDisplay(records, environments, stream)
    display.start()
    return display
