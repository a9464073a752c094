"""OpenTelemetry tracing across the process boundary, through real worker processes.

The test process exports to the SDK's in-memory exporter; workers (other processes) set up the SDK through
``WOVE_OTEL_SETUP`` and write their spans to a file (``tests.tracing_support``). Each check asserts one trace:
the caller's span, under it the submitting span of each run, under that the worker's span, and under that the
spans the task made itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import wove
from tests import tracing_support
from tests.integration.queue_support import WorkerProcess, python_command, start_worker
from tests.integration.traced_tasks import StockError, fail, inner, inner_async
from tests.services.redis import RedisServer
from tests.tracing_support import file_ids, hex_ids, worker_spans
from wove import weave
from wove.result import RunRecord

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

#: Redis database of this module (RQ's own tests use 7).
DB = 9


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return tracing_support.memory_exporter()


@pytest.fixture
def span_file(tmp_path: Path) -> Path:
    return tmp_path / "worker-spans.jsonl"


def use(environment: dict[str, Any]) -> None:
    wove.config(environments={"default": {"executor": "local"}, "jobs": environment})


def process_environment(span_file: Path) -> dict[str, Any]:
    """The ``process`` backend, its workers exporting spans to ``span_file``."""
    return {"executor": "process", "executor_config": {"env": tracing_support.worker_env(span_file), "max_workers": 2}}


def submitting_span(spans: InMemorySpanExporter, record: RunRecord) -> ReadableSpan:
    found = [s for s in spans.get_finished_spans() if (s.attributes or {}).get("wove.run_id") == record.run_id]
    assert len(found) == 1, [s.name for s in spans.get_finished_spans()]
    return found[0]


def worker_span(span_file: Path, record: RunRecord) -> dict[str, Any]:
    found = [s for s in worker_spans(span_file) if s["attributes"].get("wove.run_id") == record.run_id]
    assert len(found) == 1, worker_spans(span_file)
    return found[0]


def check_linked(
    spans: InMemorySpanExporter, span_file: Path, record: RunRecord, caller: ReadableSpan
) -> tuple[ReadableSpan, dict[str, Any]]:
    """One trace from ``caller`` through the run's submitting span to its worker span; return those two."""
    caller_trace, caller_id, _ = hex_ids(caller)
    submitted = submitting_span(spans, record)
    trace_id, span_id, parent_id = hex_ids(submitted)
    assert (trace_id, parent_id) == (caller_trace, caller_id)
    assert submitted.kind == trace.SpanKind.CLIENT
    worker = worker_span(span_file, record)
    worker_trace, worker_id, worker_parent = file_ids(worker)
    assert (worker_trace, worker_parent) == (trace_id, span_id)  # the worker span's parent is the submitting span
    attributes = submitted.attributes or {}
    assert attributes["wove.task.name"] == record.task
    assert attributes["wove.environment"] == "jobs"
    assert attributes["wove.submission"] == record.submission
    assert attributes["wove.worker.host"] == record.host
    assert attributes["wove.worker.pid"] == record.pid == worker["attributes"]["wove.worker.pid"]
    assert attributes["wove.outcome"] == record.status
    assert (attributes["wove.worker.trace_id"], attributes["wove.worker.span_id"]) == (worker_trace, worker_id)
    return submitted, worker


def children(span_file: Path, parent: dict[str, Any]) -> list[str]:
    _, parent_id, _ = file_ids(parent)
    return [s["name"] for s in worker_spans(span_file) if file_ids(s)[2] == parent_id]


# -- the process backend ---------------------------------------------------------------------------------------------


def test_one_trace_spans_the_weave_the_submission_and_the_worker(spans: InMemorySpanExporter, span_file: Path) -> None:
    use(process_environment(span_file))
    with trace.get_tracer("tests").start_as_current_span("checkout") as caller, weave(value=20) as w:

        @w.do(environment="jobs")
        def doubled(value: int) -> int:
            return inner(value)

        @w.do(environment="jobs")
        async def plus_one(value: int) -> int:
            return await inner_async(value)

    assert (w.result.doubled, w.result.plus_one) == (40, 21)
    assert isinstance(caller, ReadableSpan)
    for name, made in (("doubled", "inner work"), ("plus_one", "inner async work")):
        (record,) = w.result.records[name]
        submitted, worker = check_linked(spans, span_file, record, caller)
        assert submitted.name == f"wove.remote {name}" and worker["name"] == f"wove.task {name}"
        assert submitted.status.status_code == StatusCode.UNSET
        assert worker["kind"] == "SpanKind.SERVER" and worker["attributes"]["wove.outcome"] == "succeeded"
        assert children(span_file, worker) == [made]  # the task's own span nests under the worker's


def test_a_failing_task_marks_both_sides(spans: InMemorySpanExporter, span_file: Path) -> None:
    use(process_environment(span_file))
    with trace.get_tracer("tests").start_as_current_span("checkout") as caller, weave(error_mode="return") as w:

        @w.do(environment="jobs")
        def reserve() -> None:
            fail("sku-7")

    assert isinstance(w.result.errors["reserve"], StockError)
    assert isinstance(caller, ReadableSpan)
    (record,) = w.result.records["reserve"]
    submitted, worker = check_linked(spans, span_file, record, caller)
    assert submitted.status.status_code == StatusCode.ERROR
    assert "sku-7 is out of stock" in (submitted.status.description or "")
    assert [event.name for event in submitted.events] == ["exception"]
    assert worker["status"]["status_code"] == "ERROR" and worker["attributes"]["wove.outcome"] == "failed"
    assert [event["name"] for event in worker["events"]] == ["exception"]
    assert "StockError" in worker["events"][0]["attributes"]["exception.type"]


def test_each_run_of_a_mapped_task_has_its_own_spans(spans: InMemorySpanExporter, span_file: Path) -> None:
    use(process_environment(span_file))
    with trace.get_tracer("tests").start_as_current_span("fan out") as caller, weave(items=[1, 2, 3]) as w:

        @w.do("items", environment="jobs")
        def doubled(item: int) -> int:
            return inner(item)

    assert w.result.doubled == [2, 4, 6]
    assert isinstance(caller, ReadableSpan)
    records = w.result.records["doubled"]
    linked = [check_linked(spans, span_file, record, caller) for record in records]
    assert len({hex_ids(submitted)[1] for submitted, _ in linked}) == 3
    assert len({file_ids(worker)[1] for _, worker in linked}) == 3


def test_without_a_span_nothing_is_traced(spans: InMemorySpanExporter, span_file: Path) -> None:
    use(process_environment(span_file))
    with weave(value=3) as w:

        @w.do(environment="jobs")
        def doubled(value: int) -> int:
            return inner(value)

    assert w.result.doubled == 6
    assert spans.get_finished_spans() == ()
    assert not span_file.exists()  # no payload carried a trace context, so no worker even set up the SDK


# -- a queue backend: RQ and a real Redis ------------------------------------------------------------------------------


@pytest.fixture
def rq_worker(redis_server: RedisServer, tmp_path: Path, span_file: Path) -> Iterator[tuple[str, str]]:
    """A stock ``rq worker`` (a ``SimpleWorker``) exporting spans to ``span_file``; yields (Redis URL, queue)."""
    import rq  # noqa: F401 - a missing RQ fails this test, in CI and locally

    queue = f"wove-tracing-{uuid.uuid4().hex[:6]}"
    url = redis_server.url(DB)
    command = python_command(
        "rq.cli", "worker", "-u", url, "-w", "wove.integrations.rq_worker.SimpleWorker", "-n", queue, queue
    )
    worker: WorkerProcess = start_worker(
        command, tmp_path / "rq.log", tracing_support.worker_env(span_file), "Listening on", "rq worker"
    )
    try:
        yield url, queue
    finally:
        worker.stop()


def test_rq_worker_continues_the_trace(
    spans: InMemorySpanExporter, span_file: Path, rq_worker: tuple[str, str]
) -> None:
    url, queue = rq_worker
    use({"executor": "rq", "executor_config": {"redis_url": url, "queue_name": queue}})
    with trace.get_tracer("tests").start_as_current_span("checkout") as caller, weave(value=4) as w:

        @w.do(environment="jobs")
        def doubled(value: int) -> int:
            return inner(value)

    assert w.result.doubled == 8
    assert isinstance(caller, ReadableSpan)
    (record,) = w.result.records["doubled"]
    _, worker = check_linked(spans, span_file, record, caller)
    assert worker["attributes"]["wove.adapter"] == "rq"
    assert children(span_file, worker) == ["inner work"]


async def test_a_sync_weave_inside_a_running_loop_keeps_the_callers_span(
    spans: InMemorySpanExporter, span_file: Path
) -> None:
    """Such a weave runs on a helper thread, in a copy of the caller's context."""
    use(process_environment(span_file))
    with trace.get_tracer("tests").start_as_current_span("handler") as caller, weave(value=5) as w:

        @w.do(environment="jobs")
        def doubled(value: int) -> int:
            return inner(value)

    assert w.result.doubled == 10
    assert isinstance(caller, ReadableSpan)
    (record,) = w.result.records["doubled"]
    check_linked(spans, span_file, record, caller)
