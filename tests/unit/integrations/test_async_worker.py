"""The helper the asyncio workers (ARQ, Taskiq) run payloads through: shared connections, closed runs skipped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from wove.backend import BackendCallbackServer, aclient
from wove.backend.codec import build_backend_payload_for_run
from wove.errors import CallbackError
from wove.integrations import _async_worker

calls: list[int] = []


def record(value: int) -> int:
    calls.append(value)
    return value


class PricingError(Exception):
    pass


def refuse(value: int) -> None:
    raise PricingError(f"no price for {value}")


@pytest.fixture
async def server() -> AsyncIterator[BackendCallbackServer]:
    srv = BackendCallbackServer()
    await srv.start()
    yield srv
    await srv.stop()
    await _async_worker.close_connections()


def payload(server: BackendCallbackServer, run_id: str, fn: Any, value: int) -> dict[str, Any]:
    frame = {
        "type": "run_task",
        "run_id": run_id,
        "task_id": run_id,
        "task_name": fn.__name__,
        "callable": fn,
        "args": {"value": value},
        "delivery": {},
    }
    return build_backend_payload_for_run(frame, server=server, adapter="test")


async def frames(server: BackendCallbackServer, count: int) -> list[dict[str, Any]]:
    return [await asyncio.wait_for(server.recv(), 5) for _ in range(count)]


def idle_connections() -> list[Any]:
    return [stream for idle in (aclient._pool() or {}).values() for stream in idle]


async def test_runs_on_one_loop_share_a_connection(server: BackendCallbackServer) -> None:
    await _async_worker.run_payload(payload(server, "a", record, 1))
    (first,) = idle_connections()
    await _async_worker.run_payload(payload(server, "b", record, 2))
    assert idle_connections() == [first] and first.open  # the second run reused it
    got = await frames(server, 4)
    assert [(f["run_id"], f["type"]) for f in got if f["type"] == "task_result"] == [
        ("a", "task_result"),
        ("b", "task_result"),
    ]
    await _async_worker.close_connections()
    assert not first.open and idle_connections() == []


async def test_the_task_exception_propagates_after_it_was_reported(server: BackendCallbackServer) -> None:
    with pytest.raises(PricingError, match="no price for 7"):
        await _async_worker.run_payload(payload(server, "c", refuse, 7))
    error = (await frames(server, 2))[-1]
    assert error["type"] == "task_error" and isinstance(error["exception"], PricingError)


async def test_a_run_the_weave_closed_is_skipped_before_the_task_runs(server: BackendCallbackServer) -> None:
    calls.clear()
    closed = payload(server, "d", record, 3)
    server.close_run("d")
    assert await _async_worker.run_payload(closed) is None
    assert calls == []


async def test_other_callback_failures_propagate(server: BackendCallbackServer) -> None:
    broken = payload(server, "e", record, 4)
    broken["callback_url"] = broken["callback_url"].rsplit("/", 1)[0] + "/wrong-credential"
    with pytest.raises(CallbackError):
        await _async_worker.run_payload(broken)
