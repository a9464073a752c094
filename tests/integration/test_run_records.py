"""``w.result.records`` and ``w.result.timeline()`` for runs on the ``process`` backend: where each attempt ran, under
which backend submission, when, and how it ended."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

import wove
from wove import weave
from wove.integrations import register_adapter
from wove.integrations.process import ProcessAdapter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_records_say_where_when_and_how_each_attempt_ran(tmp_path: Path) -> None:
    wove.config(
        environments={
            "default": {},
            "pool": {"executor": "process", "executor_config": {"max_workers": 2}, "retries": 1},
        }
    )
    marker = tmp_path / "attempted"
    before = time.time()
    with weave(marker=str(marker), error_mode="return") as w:

        @w.do(environment="pool")
        def flaky(marker: str) -> int:
            if not os.path.exists(marker):
                open(marker, "w").close()
                raise ConnectionError("first attempt fails")
            return os.getpid()

        @w.do("flaky_items", environment="pool", retries=0)
        def doubled(item: int) -> int:
            return item * 2

        @w.do
        def flaky_items() -> list[int]:
            return [0, 1, 2]

    after = time.time()
    records = w.result.records
    first, second = records["flaky"]
    assert (first.attempt, first.status, second.attempt, second.status) == (1, "failed", 2, "succeeded")
    assert isinstance(first.error, ConnectionError) and second.error is None
    assert second.pid == w.result.flaky  # the worker process that ran it, not this one
    for rec in (first, second, *records["doubled"]):
        assert rec.environment == "pool"
        assert rec.host == socket.gethostname() and rec.pid is not None and rec.pid != os.getpid()
        assert rec.run_id and rec.submission == rec.run_id  # the pool knows a job by its run id
        assert rec.submitted_at is not None and rec.started_at is not None and rec.finished_at is not None
        assert before <= rec.submitted_at <= rec.started_at <= rec.finished_at <= after
    assert first.run_id != second.run_id  # each attempt is a run of its own
    assert second.submitted_at >= first.finished_at  # type: ignore[operator]  # the retry followed the failure
    assert [(r.item, r.status) for r in records["doubled"]] == [(0, "succeeded"), (1, "succeeded"), (2, "succeeded")]
    (inline,) = records["flaky_items"]
    assert (inline.environment, inline.pid, inline.submission) == ("default", os.getpid(), None)

    as_json = json.loads(json.dumps([rec.to_dict() for rec in records["flaky"]]))
    assert as_json[0]["error"] == {"type": "ConnectionError", "message": "first attempt fails"}
    assert as_json[1]["pid"] == second.pid and as_json[1]["submission"] == second.submission

    table = w.result.timeline().splitlines()
    header = "task  environment  attempt  host:pid  at ms  wait ms  run ms  status  error"
    assert table[0].split() == header.split()
    rows = {(line.split()[0], line.split()[2]): line for line in table[1:]}
    labels = {"flaky", "doubled[0]", "doubled[1]", "doubled[2]", "flaky_items"}
    assert set(rows) == {(label, "1") for label in labels} | {("flaky", "2")}
    assert rows[("flaky", "1")].endswith("failed     ConnectionError: first attempt fails")
    assert f"{socket.gethostname()}:{second.pid}" in rows[("flaky", "2")] and rows[("flaky", "2")].endswith("succeeded")


class SlowAcknowledgement(ProcessAdapter):
    """The process pool behind a backend whose submit returns well after the job ran (a slow broker acknowledgement),
    so the worker's outcome arrives before the backend's id for the job does."""

    backend = "slow_ack_process"

    async def submit(self, payload: dict[str, Any], frame: dict[str, Any]) -> Any:
        submission = await super().submit(payload, frame)
        await asyncio.sleep(0.5)
        return submission


def test_the_submission_id_is_recorded_when_the_outcome_beats_the_submission() -> None:
    register_adapter("slow_ack_process", SlowAcknowledgement, replace=True)
    wove.config(environments={"default": {}, "slow": {"executor": "slow_ack_process"}})
    with weave() as w:

        @w.do(environment="slow")
        def quick() -> int:
            return os.getpid()

    (record,) = w.result.records["quick"]
    assert record.status == "succeeded" and record.pid == w.result.quick
    assert record.submission == record.run_id
    assert record.finished_at is not None and record.started_at is not None
