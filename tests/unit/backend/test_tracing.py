"""``wove.tracing`` at the transport: the payload's ``trace_context``, the worker's span, what a cold worker imports.

The worker entrypoints run in this process against the live callback server, exporting to the in-memory exporter;
the import checks run ``python -m wove.backend_worker``'s ``main`` in a fresh interpreter.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context, trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tests import tracing_support
from tests.tracing_support import hex_ids
from tests.unit.backend import backend_tasks
from tests.unit.backend.conftest import ROOT, recv, run_task, worker_env
from wove import tracing
from wove.backend import BackendCallbackServer, build_backend_payload_for_run, payload_to_b64
from wove.backend.worker import RunTrace, run_backend_payload, run_backend_payload_async, run_payload

#: The payload keys of the spec; a payload carries no others unless a span was active.
SPEC_KEYS = {
    "version",
    "adapter",
    "callback_url",
    "run_id",
    "task_id",
    "task_name",
    "callable_pickle",
    "args_pickle",
    "delivery",
}
TERMINAL = ("task_result", "task_error", "task_cancelled")


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return tracing_support.memory_exporter()


def traced_payload(server: BackendCallbackServer, fn: Any, carrier: dict[str, str], **args: Any) -> dict[str, Any]:
    frame = {**run_task(fn, **args), "trace_context": carrier}
    return build_backend_payload_for_run(frame, server=server, adapter="test")


def submitting_side() -> tuple[trace.Span, dict[str, str]]:
    """A span standing for the submitting one, not current here, and its W3C carrier."""
    span = trace.get_tracer("tests").start_span("submitting")
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
    return span, carrier


async def frames_until_terminal(server: BackendCallbackServer) -> list[dict[str, Any]]:
    frames = [await recv(server)]
    while frames[-1]["type"] not in TERMINAL:
        frames.append(await recv(server))
    return frames


# -- the submitting side ---------------------------------------------------------------------------------------------


def test_the_parent_is_the_current_span_and_none_without_one(spans: InMemorySpanExporter) -> None:
    assert tracing.current_parent() is None
    with trace.get_tracer("tests").start_as_current_span("outer") as outer:
        parent = tracing.current_parent()
        assert parent is not None and trace.get_current_span(parent) is outer
    token = context.attach(trace.set_span_in_context(trace.INVALID_SPAN))
    try:
        assert tracing.current_parent() is None
    finally:
        context.detach(token)


def test_payloads_carry_a_trace_context_only_when_there_is_one(server: BackendCallbackServer) -> None:
    plain = build_backend_payload_for_run(run_task(backend_tasks.add, a=1, b=2), server=server, adapter="test")
    assert set(plain) == SPEC_KEYS
    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "k=v"}
    frame = {**run_task(backend_tasks.add, run_id="run-2", a=1, b=2), "trace_context": carrier}
    traced = build_backend_payload_for_run(frame, server=server, adapter="test")
    assert set(traced) == {*SPEC_KEYS, "trace_context"} and traced["trace_context"] == carrier
    json.dumps(traced)  # still JSON-safe


# -- the worker side -------------------------------------------------------------------------------------------------


@pytest.fixture(params=["sync", "async"])
def entrypoint(request: pytest.FixtureRequest) -> Any:
    async def run(payload: dict[str, Any]) -> Any:
        if request.param == "sync":
            return await asyncio.to_thread(run_backend_payload, payload)
        return await run_backend_payload_async(payload)

    return run


async def test_the_worker_continues_the_trace_and_reports_its_span(
    server: BackendCallbackServer, spans: InMemorySpanExporter, entrypoint: Any
) -> None:
    submitting, carrier = submitting_side()
    assert await entrypoint(traced_payload(server, backend_tasks.add, carrier, a=2, b=3)) == 5
    started, result = await frames_until_terminal(server)
    submitting.end()
    (worker,) = [s for s in spans.get_finished_spans() if s.name == "wove.task add"]
    trace_id, span_id, parent_id = hex_ids(worker)
    assert (trace_id, parent_id) == (carrier["traceparent"][3:35], carrier["traceparent"][36:52])
    assert worker.kind == trace.SpanKind.SERVER and worker.attributes is not None
    assert worker.attributes["wove.run_id"] == "run-1" and worker.attributes["wove.outcome"] == "succeeded"
    for frame in (started, result):
        assert (frame["trace_id"], frame["span_id"]) == (trace_id, span_id)


async def test_a_lazily_started_run_carries_the_ids_in_its_terminal_frame(
    server: BackendCallbackServer, spans: InMemorySpanExporter
) -> None:
    _, carrier = submitting_side()
    payload = traced_payload(server, backend_tasks.add, carrier, a=1, b=1)
    assert await asyncio.to_thread(run_payload, payload, RunTrace(), start="lazy") == 2
    (result,) = await frames_until_terminal(server)
    (worker,) = [s for s in spans.get_finished_spans() if s.name == "wove.task add"]
    assert "started_at" in result and (result["trace_id"], result["span_id"]) == hex_ids(worker)[:2]


async def test_a_cancelled_async_run_ends_its_span_as_cancelled(
    server: BackendCallbackServer, spans: InMemorySpanExporter
) -> None:
    _, carrier = submitting_side()
    running = asyncio.ensure_future(
        run_backend_payload_async(traced_payload(server, backend_tasks.asleep_then, carrier, seconds=30))
    )
    assert (await recv(server))["type"] == "task_started"
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert (await recv(server))["type"] == "task_cancelled"
    (worker,) = [s for s in spans.get_finished_spans() if s.name == "wove.task asleep_then"]
    assert worker.attributes is not None and worker.attributes["wove.outcome"] == "cancelled"
    assert worker.status.status_code == trace.StatusCode.ERROR


async def test_an_invalid_trace_context_runs_untraced(
    server: BackendCallbackServer, spans: InMemorySpanExporter
) -> None:
    payload = traced_payload(server, backend_tasks.add, {"traceparent": "not a traceparent"}, a=1, b=2)
    assert await asyncio.to_thread(run_backend_payload, payload) == 3
    started, _ = await frames_until_terminal(server)
    assert "trace_id" not in started and spans.get_finished_spans() == ()


# -- what a cold worker imports --------------------------------------------------------------------------------------

#: Runs one payload through the CLI worker's ``main`` and prints whether OpenTelemetry got imported.
RUN_AND_REPORT = """
import sys
from wove.backend_worker import main
status = main([sys.argv[1]])
print(status, "opentelemetry" in sys.modules)
"""

#: Makes ``opentelemetry`` unimportable, as in a worker without the ``otel`` extra.
WITHOUT_OPENTELEMETRY = """
import importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


async def run_worker(script: str, payload: dict[str, Any], **env: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        payload_to_b64(payload),
        env=worker_env(**env),
        cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


async def test_an_untraced_cold_worker_never_imports_opentelemetry(server: BackendCallbackServer) -> None:
    plain = build_backend_payload_for_run(run_task(backend_tasks.add, a=1, b=2), server=server, adapter="test")
    assert await run_worker(RUN_AND_REPORT, plain) == "0 False"
    started, result = await frames_until_terminal(server)
    assert result["result"] == 3 and "trace_id" not in started


async def test_a_traced_payload_sets_up_and_loads_opentelemetry_in_the_worker(
    server: BackendCallbackServer, tmp_path: Path
) -> None:
    _, carrier = submitting_side()
    payload = traced_payload(server, backend_tasks.add, carrier, a=1, b=2)
    assert await run_worker(RUN_AND_REPORT, payload, **tracing_support.worker_env(tmp_path / "spans")) == "0 True"
    started, result = await frames_until_terminal(server)
    (worker,) = tracing_support.worker_spans(tmp_path / "spans")
    trace_id, span_id, parent_id = tracing_support.file_ids(worker)
    assert (trace_id, parent_id) == (carrier["traceparent"][3:35], carrier["traceparent"][36:52])
    assert result["result"] == 3 and (started["trace_id"], started["span_id"]) == (trace_id, span_id)


async def test_a_worker_without_an_sdk_reports_no_span(server: BackendCallbackServer) -> None:
    """The API alone makes non-recording spans: the frames carry no ids that would name the caller's own span."""
    _, carrier = submitting_side()
    assert await run_worker(RUN_AND_REPORT, traced_payload(server, backend_tasks.add, carrier, a=1, b=2)) == "0 True"
    started, result = await frames_until_terminal(server)
    assert result["result"] == 3 and "trace_id" not in started and "trace_id" not in result


@pytest.mark.parametrize(
    ("blocker", "setup", "report"),
    [(WITHOUT_OPENTELEMETRY, "", "0 False"), ("", "tests.no_such_module:setup", "0 True")],
    ids=["without-opentelemetry", "failing-setup-hook"],
)
async def test_tracing_trouble_never_fails_a_run(
    server: BackendCallbackServer, blocker: str, setup: str, report: str
) -> None:
    _, carrier = submitting_side()
    script = "import sys\n" + blocker + RUN_AND_REPORT
    payload = traced_payload(server, backend_tasks.add, carrier, a=2, b=2)
    assert await run_worker(script, payload, WOVE_OTEL_SETUP=setup) == report
    _, result = await frames_until_terminal(server)
    assert result["result"] == 4 and "trace_id" not in result
