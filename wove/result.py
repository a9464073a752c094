"""What a weave leaves behind: each task's value or error, and a record of every run.

``w.result.priced`` and ``w.result["priced"]`` give a task's value; ``w.result.final`` the last declared task's.
In ``error_mode="return"`` a failed task's value access raises its exception, and ``w.result.errors`` maps task
names to exceptions. ``w.result.records`` says where and when each attempt ran.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from wove.errors import WoveError


@dataclass
class RunRecord:
    """One attempt of one task (one item of a mapped task): where it ran and when.

    Times are ``time.time()`` seconds. ``submitted_at`` is when the run was handed to its environment,
    ``started_at`` when the worker reported it started, ``finished_at`` when its terminal event arrived.
    """

    task: str
    environment: str
    attempt: int
    run_id: str | None = None
    item: int | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    host: str | None = None
    pid: int | None = None
    submission: str | None = None
    status: str = "pending"
    error: BaseException | None = None
    #: Run ids this attempt ran as before, when its worker was lost and ``orphan_policy="requeue"`` resubmitted it.
    lost_runs: list[str] = field(default_factory=list)

    @property
    def queue_wait(self) -> float | None:
        """Seconds between submission and start."""
        if self.submitted_at is None or self.started_at is None:
            return None
        return max(0.0, self.started_at - self.submitted_at)

    @property
    def run_time(self) -> float | None:
        """Seconds between start and the terminal event."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)

    @property
    def label(self) -> str:
        """The task's name, with the item's index for a mapped task: ``priced[3]``."""
        return self.task if self.item is None else f"{self.task}[{self.item}]"

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-safe values; the error as ``{"type", "message"}``."""
        error = None if self.error is None else {"type": type(self.error).__name__, "message": str(self.error)}
        return {
            "task": self.task,
            "item": self.item,
            "environment": self.environment,
            "attempt": self.attempt,
            "run_id": self.run_id,
            "submission": self.submission,
            "host": self.host,
            "pid": self.pid,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "status": self.status,
            "error": error,
            "lost_runs": list(self.lost_runs),
        }


_RESERVED = frozenset({"final", "errors", "records", "timeline", "names", "get"})


class WeaveResult(Mapping[str, Any]):
    """Task values by name, after the weave finished. Read-only."""

    def __init__(
        self,
        order: tuple[str, ...],
        values: dict[str, Any],
        errors: dict[str, BaseException],
        records: dict[str, list[RunRecord]],
    ) -> None:
        self._order = order
        self._values = values
        self._errors = errors
        self._records = records

    def __getitem__(self, name: str) -> Any:
        if name in self._errors:
            raise self._errors[name]
        try:
            return self._values[name]
        except KeyError:
            listed = ", ".join(self._order) or "none"
            raise KeyError(f"no task named {name!r} in this weave (tasks: {listed})") from None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._values and name not in self._errors:
            listed = ", ".join(self._order) or "none"
            raise AttributeError(f"no task named {name!r} in this weave (tasks: {listed})")
        return self[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __repr__(self) -> str:
        done = len(self._values)
        return f"<WeaveResult tasks={len(self._order)} succeeded={done} failed={len(self._errors)}>"

    @property
    def names(self) -> tuple[str, ...]:
        """Task names in declaration order."""
        return self._order

    @property
    def final(self) -> Any:
        """The value of the last declared task."""
        if not self._order:
            raise WoveError("this weave declared no tasks, so it has no final value")
        return self[self._order[-1]]

    @property
    def errors(self) -> Mapping[str, BaseException]:
        """Failed (and skipped) tasks and their exceptions; empty when everything succeeded."""
        return dict(self._errors)

    @property
    def records(self) -> Mapping[str, list[RunRecord]]:
        """Every attempt of every task, by task name."""
        return self._records

    def timeline(self) -> str:
        """A plain-text table of every run, in declaration order: where it ran, when it was submitted (ms after the
        weave's first submission), its queue wait, its run time, its status, and its error when it failed."""
        records = [rec for name in self._order for rec in self._records.get(name, [])]
        origin = min((rec.submitted_at for rec in records if rec.submitted_at is not None), default=0.0)
        failed = any(rec.error is not None for rec in records)
        header = ("task", "environment", "attempt", "host:pid", "at ms", "wait ms", "run ms", "status")
        rows: list[tuple[str, ...]] = [(*header, "error") if failed else header]
        for rec in records:
            where = f"{rec.host or '?'}:{rec.pid or '?'}"
            at = "" if rec.submitted_at is None else f"{(rec.submitted_at - origin) * 1000:.1f}"
            wait = "" if rec.queue_wait is None else f"{rec.queue_wait * 1000:.1f}"
            run = "" if rec.run_time is None else f"{rec.run_time * 1000:.1f}"
            row: tuple[str, ...] = (rec.label, rec.environment, str(rec.attempt), where, at, wait, run, rec.status)
            if failed:
                row = (*row, _error_text(rec.error))
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


#: Characters of an error's message the timeline shows.
ERROR_WIDTH = 60


def _error_text(error: BaseException | None) -> str:
    if error is None:
        return ""
    message = " ".join(str(error).split())
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= ERROR_WIDTH else text[: ERROR_WIDTH - 3] + "..."
