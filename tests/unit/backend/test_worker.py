"""Worker entrypoints in this process: frames posted, outcomes returned or re-raised, heartbeats, cancellation."""

from __future__ import annotations

import asyncio
import pickle
import time
from typing import Any

import pytest

import wove.integrations.worker
from tests.unit.backend import backend_tasks
from tests.unit.backend.conftest import no_frame, recv, run_task
from wove.backend import (
    BackendCallbackServer,
    build_backend_payload,
    build_backend_payload_for_run,
    codec,
    run_backend_payload,
    run_backend_payload_async,
)
from wove.errors import CallbackError, PayloadError


def _payload(
    server: BackendCallbackServer,
    fn: Any,
    *,
    run_id: str = "run-1",
    delivery: dict[str, Any] | None = None,
    **args: Any,
):
    frame = run_task(fn, run_id=run_id, delivery=delivery, **args)
    return build_backend_payload_for_run(frame, server=server, adapter="test")


async def _frames_until_terminal(server: BackendCallbackServer) -> list[dict[str, Any]]:
    frames = [await recv(server)]
    while frames[-1]["type"] not in ("task_result", "task_error", "task_cancelled"):
        frames.append(await recv(server))
    return frames


@pytest.fixture(params=["sync", "async"])
def runner(request: pytest.FixtureRequest):
    """Run a payload through either entrypoint (the sync one in a thread, as a worker pool would)."""

    async def run(payload: dict[str, Any]) -> Any:
        if request.param == "sync":
            return await asyncio.to_thread(run_backend_payload, payload)
        return await run_backend_payload_async(payload)

    return run


async def test_success_posts_started_then_result(server: BackendCallbackServer, runner) -> None:
    assert await runner(_payload(server, backend_tasks.add, a=2, b=3)) == 5
    started, result = await _frames_until_terminal(server)
    assert started["type"] == "task_started" and started["run_id"] == "run-1" and started["task_id"] == "task-run-1"
    assert isinstance(started["host"], str) and isinstance(started["pid"], int)
    assert started["at"] <= result.pop("at") <= time.time()
    assert started["execution"] == result.pop("execution")  # one execution id per run of the payload
    assert result == {"type": "task_result", "run_id": "run-1", "task_id": "task-run-1", "result": 5}
    assert server.pending_runs == frozenset()


async def test_task_errors_are_posted_then_reraised(server: BackendCallbackServer, runner) -> None:
    with pytest.raises(ValueError, match="kaput"):
        await runner(_payload(server, backend_tasks.boom, message="kaput"))
    _, error = await _frames_until_terminal(server)
    assert error["type"] == "task_error"
    assert isinstance(error["exception"], ValueError) and error["exception"].args == ("kaput",)
    info = error["error"]
    assert (info["kind"], info["message"], info["retryable"], info["source"]) == ("ValueError", "kaput", False, "task")
    assert "boom" in info["traceback"]


async def test_retryable_errors_say_so(server: BackendCallbackServer, runner) -> None:
    with pytest.raises(backend_tasks.RetryableError):
        await runner(_payload(server, backend_tasks.flaky))
    _, error = await _frames_until_terminal(server)
    assert error["error"]["retryable"] is True


async def test_exceptions_that_cannot_be_rebuilt_still_report(server: BackendCallbackServer, runner) -> None:
    with pytest.raises(backend_tasks.NeedsTwoArgs):
        await runner(_payload(server, backend_tasks.raise_needs_two))
    _, error = await _frames_until_terminal(server)
    assert "exception" not in error and error["error"]["message"] == "left/right"


async def test_sync_and_async_callables_run_in_both(server: BackendCallbackServer, runner) -> None:
    assert await runner(_payload(server, backend_tasks.asleep_then, run_id="a", seconds=0.01, value="A")) == "A"
    assert await runner(_payload(server, backend_tasks.sleep_then, run_id="s", seconds=0.01, value="S")) == "S"
    assert await runner(_payload(server, lambda x: x * 2, run_id="l", x=21)) == 42
    results = [frame for frame in [await recv(server) for _ in range(6)] if frame["type"] == "task_result"]
    assert [frame["result"] for frame in results] == ["A", "S", 42]


async def test_unpicklable_results_become_worker_errors(server: BackendCallbackServer, runner) -> None:
    with pytest.raises(PayloadError, match="cannot pickle the result"):
        await runner(_payload(server, backend_tasks.lock))
    _, error = await _frames_until_terminal(server)
    assert error["error"]["source"] == "worker" and error["error"]["kind"] == "wove.errors.PayloadError"


async def test_payloads_that_cannot_load_report_a_worker_error(server: BackendCallbackServer, runner) -> None:
    payload = _payload(server, backend_tasks.add, a=1, b=2)
    payload["callable_pickle"] = codec.b64encode(b"cno_such_mod\nf\n.")  # a function of a module the worker lacks
    with pytest.raises(PayloadError, match="no_such_mod"):
        await runner(payload)
    error = await recv(server)
    assert error["type"] == "task_error" and error["error"]["source"] == "worker"
    assert "no_such_mod" in error["error"]["message"]


@pytest.mark.parametrize("version", [0, 2, None])
async def test_unknown_payload_versions_are_refused(server: BackendCallbackServer, runner, version: object) -> None:
    payload = {**_payload(server, backend_tasks.add, a=1, b=2), "version": version}
    with pytest.raises(PayloadError, match="unsupported payload version"):
        await runner(payload)
    await no_frame(server, 0.05)


async def test_payloads_must_hold_a_callable_and_keywords(server: BackendCallbackServer, runner) -> None:
    payload = _payload(server, backend_tasks.add, a=1, b=2)
    payload["args_pickle"] = codec.b64encode(pickle.dumps([1, 2]))
    with pytest.raises(PayloadError, match="keyword dict"):
        await runner(payload)


async def test_sync_entrypoint_refuses_a_running_loop(server: BackendCallbackServer) -> None:
    with pytest.raises(RuntimeError, match="run_backend_payload_async"):
        run_backend_payload(_payload(server, backend_tasks.add, a=1, b=2))


async def test_integration_entrypoints_are_the_backend_ones() -> None:
    assert wove.integrations.worker.run is run_backend_payload
    assert wove.integrations.worker.arun is run_backend_payload_async


async def test_the_plain_composition_uses_the_master_url(server: BackendCallbackServer, runner) -> None:
    frame = run_task(backend_tasks.add, run_id="plain", a=20, b=22)
    payload = build_backend_payload(frame, callback_url=server.callback_url, adapter="test")
    assert await runner(payload) == 42
    assert [f["type"] for f in await _frames_until_terminal(server)] == ["task_started", "task_result"]


# -- heartbeats -------------------------------------------------------------------------------------------------------


async def test_heartbeats_flow_while_the_task_runs(server: BackendCallbackServer, runner) -> None:
    payload = _payload(server, backend_tasks.sleep_then, delivery={"heartbeat_seconds": 0.15}, seconds=0.45, value=1)
    assert await runner(payload) == 1
    kinds = [frame["type"] for frame in await _frames_until_terminal(server)]
    assert kinds[0] == "task_started" and kinds[-1] == "task_result"
    assert 3 <= kinds.count("heartbeat") <= 12  # every 0.05 s for 0.45 s (fewer on a loaded machine)


@pytest.mark.parametrize("seconds", [None, 0, True, "3"])
async def test_no_heartbeats_without_a_window(server: BackendCallbackServer, runner, seconds: object) -> None:
    payload = _payload(server, backend_tasks.sleep_then, delivery={"heartbeat_seconds": seconds}, seconds=0.1)
    await runner(payload)
    assert [frame["type"] for frame in await _frames_until_terminal(server)] == ["task_started", "task_result"]


async def test_a_closed_run_stops_heartbeats_and_its_result_counts_as_delivered(
    server: BackendCallbackServer, runner
) -> None:
    payload = _payload(server, backend_tasks.sleep_then, delivery={"heartbeat_seconds": 0.06}, seconds=0.4, value=7)
    running = asyncio.ensure_future(runner(payload))
    assert (await recv(server))["type"] == "task_started"
    assert (await recv(server))["type"] == "heartbeat"
    server.close_run("run-1")  # e.g. the weave cancelled it
    assert await asyncio.wait_for(running, 5) == 7
    await no_frame(server, 0.1)


# -- cancellation and by-reference bodies ------------------------------------------------------------------------------


async def test_cancelling_the_async_entrypoint_posts_task_cancelled(server: BackendCallbackServer) -> None:
    payload = _payload(server, backend_tasks.asleep_then, seconds=30)
    running = asyncio.ensure_future(run_backend_payload_async(payload))
    assert (await recv(server))["type"] == "task_started"
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    cancelled = await recv(server)
    assert (cancelled["type"], cancelled["run_id"], cancelled["task_id"]) == ("task_cancelled", "run-1", "task-run-1")


async def test_by_reference_bodies_are_fetched_once(server: BackendCallbackServer, runner) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB: above the inline limit and the async offload threshold
    frame = run_task(backend_tasks.reverse, data=data)
    payload = build_backend_payload_for_run(frame, server=server, adapter="test", inline_limit=1024)
    assert isinstance(payload["args_pickle"], dict)
    assert await runner(payload) == data[::-1]
    assert [f["type"] for f in await _frames_until_terminal(server)] == ["task_started", "task_result"]
    # the run is over: a redelivered copy of the payload cannot fetch its body
    with pytest.raises(CallbackError) as info:
        await runner(payload)
    assert info.value.reason == "run_not_pending"


async def test_a_second_worker_cannot_fetch_a_claimed_body(server: BackendCallbackServer, runner) -> None:
    frame = run_task(backend_tasks.sleep_then, seconds=0.3, value=b"x" * 10_000)
    payload = build_backend_payload_for_run(frame, server=server, adapter="test", inline_limit=100)
    first = asyncio.ensure_future(runner(payload))
    assert (await recv(server))["type"] == "task_started"
    with pytest.raises(CallbackError) as info:
        await runner(payload)
    assert (info.value.status, info.value.reason) == (404, "blob_not_found")
    await first


# -- how task_started goes out, and the callable cache --------------------------------------------------------------


def _run_with(payload: dict[str, Any], start: str) -> Any:
    from wove.backend.worker import RunTrace, run_payload

    return run_payload(payload, RunTrace(), start=start)


async def test_a_pipelined_start_still_reaches_the_server_first(server: BackendCallbackServer) -> None:
    payload = _payload(server, backend_tasks.add, a=2, b=3)
    assert await asyncio.to_thread(_run_with, payload, "pipelined") == 5
    started, result = await _frames_until_terminal(server)
    assert started["type"] == "task_started" and result["result"] == 5


async def test_a_pipelined_start_that_is_refused_ends_the_run(server: BackendCallbackServer) -> None:
    payload = _payload(server, backend_tasks.add, a=2, b=3)
    server.close_run("run-1")
    with pytest.raises(CallbackError) as info:
        await asyncio.to_thread(_run_with, payload, "pipelined")
    assert info.value.reason == "run_not_pending"
    await no_frame(server, 0.05)


async def test_a_short_lazily_started_run_carries_its_start(server: BackendCallbackServer) -> None:
    payload = _payload(server, backend_tasks.add, a=2, b=3)
    assert await asyncio.to_thread(_run_with, payload, "lazy") == 5
    (result,) = await _frames_until_terminal(server)
    assert result["type"] == "task_result" and result["result"] == 5
    assert result["started_at"] <= result["at"] and isinstance(result["host"], str) and isinstance(result["pid"], int)


async def test_a_long_lazily_started_run_posts_task_started_in_order(server: BackendCallbackServer) -> None:
    payload = _payload(server, backend_tasks.sleep_then, seconds=0.3, value="done")
    assert await asyncio.to_thread(_run_with, payload, "lazy") == "done"
    started, result = await _frames_until_terminal(server)
    assert started["type"] == "task_started" and started["started_at"] <= started["at"]
    assert result["type"] == "task_result" and "started_at" not in result


async def test_a_lazily_started_failure_carries_its_start(server: BackendCallbackServer) -> None:
    with pytest.raises(ValueError, match="kaput"):
        await asyncio.to_thread(_run_with, _payload(server, backend_tasks.boom, message="kaput"), "lazy")
    (error,) = await _frames_until_terminal(server)
    assert error["type"] == "task_error" and "started_at" in error


async def test_a_mapped_callable_is_unpickled_once_per_worker(server: BackendCallbackServer, runner) -> None:
    import uuid

    from wove.backend import worker

    calls: list[Any] = [uuid.uuid4().hex]  # a pickle of its own, whatever other tests left in the cache

    def task(x: int) -> list[Any]:  # pickled by value; its closure list is shared only if the object is reused
        calls.append(x)
        return calls[1:]

    first = await runner(_payload(server, task, run_id="a", x=1))
    second = await runner(_payload(server, task, run_id="b", x=2))
    assert (first, second) == ([1], [1, 2])  # the second run got the very function object of the first
    assert any(fn.__name__ == "task" for fn in worker._callables.values())
    for _ in range(2):
        await _frames_until_terminal(server)


# -- duplicate deliveries ---------------------------------------------------------------------------------------------


async def test_a_second_delivery_of_a_started_run_never_runs_the_body(
    server: BackendCallbackServer, runner, tmp_path
) -> None:
    """An at-least-once backend may hand the same payload to two workers while the first still runs: the second's
    task_started is refused (409) and it raises, marked as a duplicate delivery, without running the task; the
    first one's frames still count. After the run resolved, a late copy is refused the same way."""
    marker = tmp_path / "ran"
    first_payload = _payload(server, backend_tasks.sleep_then, seconds=0.3, value=1)
    first = asyncio.ensure_future(asyncio.to_thread(run_backend_payload, first_payload))
    started = await recv(server)
    assert started["type"] == "task_started" and isinstance(started["execution"], str)
    duplicate = _payload(server, backend_tasks.touch, path=str(marker))  # same run id, another body
    with pytest.raises(CallbackError, match="run_already_started") as refused:
        await runner(duplicate)
    assert refused.value.status == 409 and refused.value.duplicate_delivery and not marker.exists()
    assert await asyncio.wait_for(first, 5) == 1
    assert (await recv(server))["type"] == "task_result"
    with pytest.raises(CallbackError, match="run_not_pending") as late:
        await runner(duplicate)
    assert late.value.duplicate_delivery and not marker.exists()
    await no_frame(server, 0.1)
