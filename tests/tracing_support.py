"""The OpenTelemetry SDK set up for the tracing tests: in memory in the test process, to a file in workers.

Workers are other processes, so their spans cannot land in the test's in-memory exporter. A worker started with
``WOVE_OTEL_SETUP=tests.tracing_support:setup`` and ``WOVE_TEST_SPAN_FILE=PATH`` appends each finished span to
PATH as one JSON line (the SDK's own console exporter, pointed at that file). Spans are exported as they end, and
a worker span ends before its run's outcome is posted, so the file is complete once the weave has its results.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

#: Environment variable naming the file a worker writes its spans to.
SPAN_FILE_ENV = "WOVE_TEST_SPAN_FILE"
#: What a worker's ``WOVE_OTEL_SETUP`` names.
SETUP = "tests.tracing_support:setup"

_memory: list[InMemorySpanExporter] = []


def setup() -> None:
    """Worker side: export every finished span as one JSON line to the file ``WOVE_TEST_SPAN_FILE`` names."""
    out = open(os.environ[SPAN_FILE_ENV], "a", encoding="utf-8")  # noqa: SIM115 - open for the process's life
    provider = TracerProvider(resource=Resource.create({"service.name": "wove-test-worker"}))
    exporter = ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def memory_exporter() -> InMemorySpanExporter:
    """Test side: the process-wide in-memory exporter, emptied (the global provider can be set only once)."""
    if not _memory:
        exporter = InMemorySpanExporter()
        provider = TracerProvider(resource=Resource.create({"service.name": "wove-test"}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _memory.append(exporter)
    _memory[0].clear()
    return _memory[0]


def worker_env(path: Path) -> dict[str, str]:
    """Environment variables for a worker that writes its spans to ``path``."""
    return {"WOVE_OTEL_SETUP": SETUP, SPAN_FILE_ENV: str(path)}


def worker_spans(path: Path) -> list[dict[str, Any]]:
    """The spans workers wrote to ``path``, each a dict of the SDK's JSON form."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def hex_ids(span: ReadableSpan) -> tuple[str, str, str | None]:
    """A finished span's trace id, span id and parent span id, in W3C hex."""
    context = span.get_span_context()
    assert context is not None
    parent = span.parent
    return (
        trace.format_trace_id(context.trace_id),
        trace.format_span_id(context.span_id),
        trace.format_span_id(parent.span_id) if parent is not None else None,
    )


def file_ids(span: dict[str, Any]) -> tuple[str, str, str | None]:
    """A worker span's trace id, span id and parent span id (from its JSON form), in W3C hex."""
    parent = span.get("parent_id")
    return (
        span["context"]["trace_id"].removeprefix("0x"),
        span["context"]["span_id"].removeprefix("0x"),
        parent.removeprefix("0x") if parent else None,
    )
