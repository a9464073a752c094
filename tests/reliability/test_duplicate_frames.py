"""Every terminal frame delivered twice and out of order: each run resolves once, with the right value.

What must hold: whatever order and however often a backend delivers a run's frames (the result before
``task_started``, a heartbeat after the result, the result again, a late error or cancel, a second execution's
outcome), each run resolves exactly once, from its first terminal frame. Tested end to end (a weave, the runtime's
``RunTable``, ``BackendAdapterEnvironmentExecutor``, the callback server) with an in-process adapter that scrambles
delivery, and property-based on ``RunTable`` itself, where duplicates arrive that the server would have stopped.
"""

from __future__ import annotations

import asyncio
import http.client
import random
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wove
from tests.reliability.transport_support import json_body, path_of, record
from wove import weave
from wove._types import TERMINAL_EVENTS, Frame
from wove.backend import codec
from wove.environment import runs
from wove.environment.remote import BackendAdapterEnvironmentExecutor
from wove.environment.runs import RunRequest, RunTable
from wove.errors import RunCancelledError
from wove.integrations.base import BackendAdapter
from wove.result import RunRecord

RUNS = 60
TABLE_EXAMPLES = 400


class ScrambledDeliveryAdapter(BackendAdapter):
    """A stand-in for an at-least-once backend gone wrong (in process: no real backend scrambles on demand).

    Each payload's task runs once, in a thread; then its frames reach the run's callback URL in a shuffled order
    with every terminal frame at least twice, the right result always the first terminal frame: half the runs
    post the result before ``task_started``. A second execution posts a wrong result, and the adapter itself
    reports the run lost after it finished (a late ``emit``).
    """

    backend = "scrambled"
    statuses: ClassVar[Counter[str]] = Counter()
    lock: ClassVar[threading.Lock] = threading.Lock()
    deliveries: ClassVar[list[threading.Thread]] = []

    async def submit(self, payload: Frame, frame: Frame) -> Any:
        thread = threading.Thread(target=self._deliver, args=(payload,), daemon=True)
        self.deliveries.append(thread)
        thread.start()
        return payload["run_id"]

    async def cancel(self, run_id: str, submission: Any, frame: Frame) -> None:
        return None

    def _deliver(self, payload: Frame) -> None:
        fn = codec.loads(codec.b64decode(payload["callable_pickle"], "callable"), "callable")
        args = codec.loads(codec.b64decode(payload["args_pickle"], "args"), "args")
        value = fn(**args)
        run_id, shuffle = payload["run_id"], random.Random(payload["run_id"])
        base = {"run_id": run_id, "task_id": payload["task_id"], "execution": "first"}
        error = codec.error_info(RuntimeError("late"), source="task")
        result = {**base, "type": "task_result", "result": value}
        rest = [
            {**base, "type": "task_started"},
            {**base, "type": "heartbeat"},
            result,
            {**base, "type": "task_error", "error": error},
            {**base, "type": "task_cancelled"},
            {**base, "type": "heartbeat"},
            {**base, "type": "task_result", "result": "wrong", "execution": "second"},
        ]
        shuffle.shuffle(rest)
        # the result first (before task_started), or after a task_started and a heartbeat
        frames = [result, *rest] if shuffle.random() < 0.5 else [{**base, "type": "task_started"}, result, *rest]
        path = path_of(payload["callback_url"])
        host, port = payload["callback_url"].split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            for frame in frames:
                for _ in range(2):  # every frame twice
                    conn.request("POST", path, body=json_body(frame), headers={"Content-Type": "application/json"})
                    response = conn.getresponse()
                    reason = response.read()
                    with self.lock:
                        self.statuses[f"{frame['type']} {response.status} {_reason(reason)}"] += 1
        finally:
            conn.close()
        self.report_lost({"run_id": run_id, "task_id": payload["task_id"]}, "reported after the run had ended")


def _reason(body: bytes) -> str:
    text = body.decode(errors="replace")
    return text.split('"')[3] if text.count('"') >= 4 else text


@pytest.fixture
def resolutions(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """How often ``RunTable`` resolved each run (a spy on its one resolving method)."""
    counts: Counter[str] = Counter()
    original = RunTable._resolve

    def spy(self: RunTable, run: runs.PendingRun, **outcome: Any) -> None:
        counts[run.run_id] += 1
        original(self, run, **outcome)

    monkeypatch.setattr(RunTable, "_resolve", spy)
    yield counts


def test_scrambled_and_duplicated_frames_resolve_each_run_once_with_its_value(resolutions: Counter[str]) -> None:
    ScrambledDeliveryAdapter.statuses.clear()
    ScrambledDeliveryAdapter.deliveries.clear()
    wove.config(
        environments={
            "default": {},
            "scrambled": {"executor": lambda: BackendAdapterEnvironmentExecutor("scrambled", ScrambledDeliveryAdapter)},
        }
    )
    with weave() as w:

        @w.do(list(range(RUNS)), environment="scrambled")
        def square(item: int) -> int:
            return item * item

    for thread in ScrambledDeliveryAdapter.deliveries:  # the duplicates still in flight when the weave ended
        thread.join(60)
    assert not any(thread.is_alive() for thread in ScrambledDeliveryAdapter.deliveries)
    assert w.result.square == [n * n for n in range(RUNS)]
    records = w.result.records["square"]
    assert len(records) == RUNS and {record.status for record in records} == {"succeeded"}
    assert len(resolutions) == RUNS and set(resolutions.values()) == {1}
    statuses = ScrambledDeliveryAdapter.statuses
    accepted_terminal = sum(n for key, n in statuses.items() if key.split()[0] in TERMINAL_EVENTS and " 200 " in key)
    assert accepted_terminal == RUNS  # the server let exactly one terminal frame per run through
    posted = sum(statuses.values())
    record(
        "fault: every frame twice and out of order (weave, runtime, executor, server)",
        runs=RUNS,
        frames_posted=posted,
        terminal_frames_posted=sum(n for key, n in statuses.items() if key.split()[0] in TERMINAL_EVENTS),
        terminal_frames_accepted=accepted_terminal,
        resolved=len(resolutions),
        resolved_twice=sum(1 for n in resolutions.values() if n > 1),
        wrong_values=0,
        statuses=dict(statuses),
    )


# -- the run table on its own: duplicates the server would have stopped ---------------------------------------------

FRAMES: list[Frame] = [
    {"type": "task_started"},
    {"type": "heartbeat"},
    {"type": "task_result", "result": "right"},
    {"type": "task_result", "result": "wrong"},
    {"type": "task_error", "error": {"kind": "X", "message": "late", "traceback": "", "retryable": False}},
    {"type": "task_cancelled"},
    {"type": "heartbeat"},
]


def _outcome(frame: Frame) -> tuple[str, Any]:
    if frame["type"] == "task_result":
        return "result", frame["result"]
    if frame["type"] == "task_error":
        return "error", "late"
    return "cancelled", None


async def _deliver(frames: list[Frame]) -> tuple[tuple[str, Any], str]:
    table = RunTable(send_cancel=lambda run: None)
    record_ = RunRecord(task="t", environment="remote", attempt=1)
    request = RunRequest("remote", "t", "t-1", len, {}, {"heartbeat_seconds": 60, "timeout": 60}, record_)
    run = table.open(request)
    for frame in frames:
        table.on_frame("remote", {**frame, "run_id": run.run_id, "task_id": "t-1"})
        table.on_frame("other-environment", {**frame, "run_id": run.run_id})  # never its environment: dropped
    assert run.future.done() and len(table) == 0 and not run.timers
    if run.future.cancelled():
        return ("cancelled", None), record_.status
    exc = run.future.exception()
    if isinstance(exc, RunCancelledError):
        return ("cancelled", None), record_.status
    if exc is not None:
        return ("error", getattr(exc, "error", {}).get("message")), record_.status
    return ("result", run.future.result()), record_.status


def test_the_run_table_resolves_from_the_first_terminal_frame_whatever_follows() -> None:
    seen: Counter[str] = Counter()
    loop = asyncio.new_event_loop()
    try:

        @settings(max_examples=TABLE_EXAMPLES, database=None, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            order=st.permutations(range(len(FRAMES))),
            copies=st.lists(st.tuples(st.integers(0, len(FRAMES) - 1), st.integers(0, 20)), max_size=10),
        )
        def check(order: list[int], copies: list[tuple[int, int]]) -> None:
            frames = [FRAMES[i] for i in order]
            for index, at in copies:  # duplicates anywhere, including before the original
                frames.insert(min(at, len(frames)), FRAMES[index])
            first = next(frame for frame in frames if frame["type"] in TERMINAL_EVENTS)
            outcome, status = loop.run_until_complete(_deliver(frames))
            assert outcome == _outcome(first)
            assert status == {"result": "succeeded", "error": "failed", "cancelled": "cancelled"}[outcome[0]]
            seen[f"{outcome[0]} {outcome[1]}"] += 1

        check()
    finally:
        loop.close()
    record("fault: RunTable, shuffled and duplicated frames", examples=TABLE_EXAMPLES, outcomes=dict(seen))
    assert seen["result right"] and seen["result wrong"] and seen["error late"] and seen["cancelled None"]
