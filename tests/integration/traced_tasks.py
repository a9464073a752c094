"""Task functions for the tracing tests: each opens a span of its own, which must nest under the worker's span."""

from __future__ import annotations

import asyncio

from opentelemetry import trace


class StockError(Exception):
    """Raised in a worker; its span and the submitting span both record it."""


def inner(value: int) -> int:
    with trace.get_tracer("tests.traced_tasks").start_as_current_span("inner work"):
        return value * 2


async def inner_async(value: int) -> int:
    with trace.get_tracer("tests.traced_tasks").start_as_current_span("inner async work"):
        await asyncio.sleep(0)
        return value + 1


def fail(sku: str) -> None:
    raise StockError(f"{sku} is out of stock")
