"""The progress display: drawn only for a terminal, for weaves with remote tasks, in place, and erased at the end."""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import pytest

import wove
from wove import weave
from wove.progress import ProgressDisplay, maybe_display, progress_enabled, render
from wove.result import RunRecord

ROOT = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9]*[A-Za-z]")


class Terminal(io.StringIO):
    """A text stream that says it is a terminal, as a real tty would."""

    def isatty(self) -> bool:
        return True


def screen(output: str) -> list[str]:
    """Replay ``output`` (text, CR, LF and the display's cursor-up and erase escapes) onto a list of screen lines."""
    lines = [""]
    row = col = 0
    for token in re.split(r"(\x1b\[[0-9]*[A-Za-z]|\r|\n)", output):
        if not token:
            continue
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append("")
        elif token.startswith("\x1b["):
            arg, code = token[2:-1], token[-1]
            if code == "A":
                row = max(0, row - int(arg or 1))
            elif code == "K":
                lines[row] = ""
            elif code == "J":
                lines[row] = lines[row][:col]
                del lines[row + 1 :]
        else:
            current = lines[row].ljust(col)
            lines[row] = current[:col] + token + current[col + len(token) :]
            col += len(token)
    return lines


def test_enabled_only_for_terminals_and_not_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WOVE_PROGRESS", raising=False)
    assert progress_enabled(None, Terminal())
    assert progress_enabled(True, Terminal())
    assert not progress_enabled(None, io.StringIO())
    assert not progress_enabled(False, Terminal())
    for off in ("0", "false", "OFF"):
        monkeypatch.setenv("WOVE_PROGRESS", off)
        assert not progress_enabled(None, Terminal())
    monkeypatch.setenv("WOVE_PROGRESS", "1")
    assert progress_enabled(None, Terminal())


def test_render_counts_throughput_and_oldest_running_task_per_environment() -> None:
    now = 1_000.0
    records = {
        "a": [
            RunRecord("a", "heavy", 1, status="succeeded"),
            RunRecord("a", "heavy", 1, item=4, status="running", started_at=now - 2, host="node4", pid=31),
            RunRecord("a", "heavy", 1, item=5, status="running", started_at=now - 0.5, host="node5", pid=7),
            RunRecord("a", "heavy", 1, status="submitted"),
        ],
        "b": [
            RunRecord("b", "heavy", 1, status="failed"),
            RunRecord("b", "heavy", 2, status="lost"),
            RunRecord("b", "gpu", 1, status="running", started_at=now - 9),
            RunRecord("b", "default", 1, status="succeeded"),
        ],
    }
    lines = render(records, {"heavy", "gpu"}, started=0.0, now=3.0, clock=now)
    assert len(lines) == 2
    gpu, heavy = lines  # sorted by environment name
    assert re.search(
        r"heavy +1 submitted +2 running +1 done +2 failed +1\.0/s +oldest: a\[4\] 2\.0s on node4:31$", heavy
    )
    assert re.search(r"gpu +0 submitted +1 running +0 done +0 failed +0\.0/s +oldest: b 9\.0s$", gpu)
    assert not any("default" in line for line in lines)


def test_draw_replaces_its_lines_in_place_and_stop_erases_them() -> None:
    terminal = Terminal()
    terminal.write("before\n")
    display = ProgressDisplay({}, {"a", "b"}, terminal)
    display.draw(["wove  a  first", "wove  b  first"])
    assert screen(terminal.getvalue()) == ["before", "wove  a  first", "wove  b  first"]
    display.draw(["wove  a  second", "wove  b  2"])
    assert screen(terminal.getvalue()) == ["before", "wove  a  second", "wove  b  2"]

    async def started_then_stopped() -> None:
        display.start()
        await display.stop()

    asyncio.run(started_then_stopped())
    assert screen(terminal.getvalue()) == ["before", ""]  # erased; the cursor where the display began


def test_a_long_line_is_cut_to_the_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    terminal = Terminal()
    ProgressDisplay({}, {"a"}, terminal).draw(["x" * 100])
    assert screen(terminal.getvalue()) == ["x" * 39]


def test_display_draws_while_remote_tasks_run_and_erases_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WOVE_PROGRESS", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
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
    assert re.search(r"wove  side +0 submitted +1 running +0 done +0 failed +0\.0/s +oldest: slow \d\.\ds on ", output)
    assert screen(output) == [""]  # erased, the cursor back where the display began
    assert output.endswith("\r\x1b[J")


def test_one_display_at_a_time() -> None:
    first = Terminal()

    async def both() -> tuple[ProgressDisplay | None, ProgressDisplay | None]:
        one = maybe_display({}, {"a"}, None, first)
        two = maybe_display({}, {"a"}, None, Terminal())
        assert one is not None
        await one.stop()
        three = maybe_display({}, {"a"}, None, Terminal())  # the first one is done: the next may draw
        assert three is not None
        await three.stop()
        return one, two

    one, two = asyncio.run(both())
    assert one is not None and two is None


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


SCRIPT = textwrap.dedent(
    """
    import sys, time
    import wove
    from wove import weave

    wove.config(
        environments={"default": {}, "pool": {"executor": "process", "executor_config": {"max_workers": 2}}},
        progress=None if sys.argv[1] == "default" else False,
    )
    with weave(n=4, seconds=float(sys.argv[2])) as w:
        @w.do
        def range_n(n):
            return list(range(n))

        @w.do("range_n", environment="pool")
        def nap(item, seconds):
            time.sleep(seconds)
            return item

    print("results", w.result.nap, flush=True)
    """
)


def run_on_a_terminal(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    """Run the script with its standard error on a pseudo-terminal; return (stdout, what the terminal received)."""
    script = tmp_path / "progress_script.py"
    script.write_text(SCRIPT)
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns
    child = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=terminal,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    os.close(terminal)
    received = b""
    while True:
        ready, _, _ = select.select([controller], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the child closed its side of the terminal
            break
        if not chunk:
            break
        received += chunk
    os.close(controller)
    stdout, _ = child.communicate(timeout=60)
    assert child.returncode == 0, received.decode(errors="replace")
    return stdout.decode(), received.decode(errors="replace")


def test_a_real_terminal_shows_the_display_while_the_process_pool_runs_and_it_disappears(tmp_path: Path) -> None:
    stdout, received = run_on_a_terminal(tmp_path, "default", "0.5", env={"WOVE_PROGRESS": ""})
    assert "results [0, 1, 2, 3]" in stdout
    assert re.search(r"wove  pool +\d+ submitted +\d+ running +\d+ done +0 failed +\d+\.\d/s", received)
    assert re.search(r"oldest: nap\[\d\] \d\.\ds on \S+:\d+", received)  # a task running in a pool worker
    assert screen(received.replace("\r\n", "\n")) == [""]  # nothing of the display is left on screen


def test_a_real_terminal_shows_nothing_when_disabled(tmp_path: Path) -> None:
    _, by_config = run_on_a_terminal(tmp_path, "off", "0.3")
    _, by_variable = run_on_a_terminal(tmp_path, "default", "0.3", env={"WOVE_PROGRESS": "0"})
    assert "wove  pool" not in by_config and "wove  pool" not in by_variable
    assert ANSI.search(by_config) is None and ANSI.search(by_variable) is None
