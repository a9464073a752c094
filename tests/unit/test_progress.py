"""The progress line: drawn only for a terminal, for weaves with remote tasks, and erased at the end."""

from __future__ import annotations

import io
import time

import pytest

import wove
from wove import weave
from wove.progress import progress_enabled, render
from wove.result import RunRecord


class Terminal(io.StringIO):
    """A text stream that says it is a terminal, as a real tty would."""

    def isatty(self) -> bool:
        return True


def test_enabled_only_for_terminals_and_not_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WOVE_PROGRESS", raising=False)
    assert progress_enabled(None, Terminal())
    assert not progress_enabled(None, io.StringIO())
    assert not progress_enabled(False, Terminal())
    monkeypatch.setenv("WOVE_PROGRESS", "0")
    assert not progress_enabled(None, Terminal())


def test_render_counts_per_environment() -> None:
    now = time.time()
    records = {
        "a": [
            RunRecord("a", "heavy", 1, status="succeeded"),
            RunRecord("a", "heavy", 1, status="running", started_at=now - 2),
            RunRecord("a", "heavy", 1, status="submitted"),
        ],
        "b": [RunRecord("b", "heavy", 1, status="failed"), RunRecord("b", "default", 1, status="succeeded")],
    }
    line = render(records, {"heavy"}, started=0.0, now=2.0)
    assert "heavy: 1 queued, 1 running, 1 done, 1 failed" in line
    assert "1.0/s" in line and "oldest running 2." in line
    assert "default" not in line


def test_display_draws_while_remote_tasks_run_and_erases_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WOVE_PROGRESS", raising=False)
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    wove.config(environments={"default": {}, "side": {"executor": "local"}})
    with weave() as w:

        @w.do(environment="side")
        def slow() -> int:
            time.sleep(0.6)
            return 1

    assert w.result.slow == 1
    output = terminal.getvalue()
    assert "wove | side: 0 queued, 1 running" in output
    assert output.endswith("\r")  # the last write blanks the line and returns the cursor


def test_no_display_for_inline_only_weaves(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with weave() as w:

        @w.do
        def slow() -> int:
            time.sleep(0.3)
            return 1

    assert terminal.getvalue() == ""


def test_progress_setting_is_validated() -> None:
    with pytest.raises(wove.ConfigError, match="progress"):
        wove.config(progress="yes")  # type: ignore[arg-type]
